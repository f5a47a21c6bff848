"""Kombu's own integration base classes (t/integration/common.py) on one URL.

Copied by ``python -m compat.upstream`` beside Kombu 5.7's
``t/integration/common.py`` as ``test_upstream_kombu.py`` and run once per
system, as Kombu's own ``test_redis.py`` and ``test_py_amqp.py`` subclass
the same classes for their brokers. ``UPSTREAM_KOMBU_URL`` is the broker
under test (pgbroker, or Redis as the reference); ``UPSTREAM_KOMBU_DEAD_URL``
a URL of the same scheme where nothing listens.
"""

from __future__ import annotations

import os

import kombu
import pytest

from .common import (
    BaseEventLoop,
    BaseExchangeTypes,
    BaseFailover,
    BaseMessage,
    BasePriority,
    BaseTimeToLive,
    BasicFunctionality,
)

URL = os.environ["UPSTREAM_KOMBU_URL"]
DEAD_URL = os.environ["UPSTREAM_KOMBU_DEAD_URL"]


@pytest.fixture()
def connection():
    return kombu.Connection(URL)


@pytest.fixture()
def invalid_connection():
    return kombu.Connection(DEAD_URL)


@pytest.fixture()
def failover_connection():
    # The first URL is dead, the alternate is live (BaseFailover checks both).
    return kombu.Connection([DEAD_URL, URL], connect_timeout=2)


class test_BasicFunctionality(BasicFunctionality):
    pass


class test_ExchangeTypes(BaseExchangeTypes):
    pass


class test_TimeToLive(BaseTimeToLive):
    pass


class test_Priority(BasePriority):
    pass


class test_Message(BaseMessage):
    pass


class test_EventLoop(BaseEventLoop):
    pass


class test_Failover(BaseFailover):
    pass
