"""The Redis and RabbitMQ that some tests use as references or as a broker.

Their URLs come from the environment, ``PGBROKER_TEST_REDIS_URL`` (default
``redis://127.0.0.1:6379/0``) and ``PGBROKER_TEST_AMQP_URL`` (default
``amqp://guest:guest@127.0.0.1:5672//``): they may be shared with other
users. A test therefore never flushes a database nor uses a queue it did not
create: it takes a name of its own (``unique_name``), and on Redis a key
prefix of its own (``redis_namespace``), and deletes only what it created.
A test whose server does not answer is skipped.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection

REDIS_URL = os.environ.get("PGBROKER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("PGBROKER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def unique_name(what: str) -> str:
    """A queue (or key prefix) name no other test or user has."""
    return f"pgbtest-{what}-{uuid.uuid4().hex[:12]}"


def answers(url: str) -> bool:
    """Whether the broker at ``url`` answers (and its client is installed)."""
    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
        return True
    except Exception:
        return False


def redis_client_or_skip() -> Any:
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=10)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {REDIS_URL} ({exc}): set PGBROKER_TEST_REDIS_URL")
    return client


def delete_keys(client: Any, pattern: str) -> int:
    """Delete the keys matching ``pattern`` (SCAN, never KEYS or a flush)."""
    keys = list(client.scan_iter(match=pattern, count=1000))
    return int(client.delete(*keys)) if keys else 0


@contextlib.contextmanager
def redis_namespace(what: str) -> Iterator[tuple[Any, str]]:
    """A Redis client and a key prefix of this test's own; its keys go at the end.

    Give the prefix to Kombu and Celery as ``global_keyprefix`` (in
    ``broker_transport_options`` and ``result_backend_transport_options``):
    every key, list and pub/sub channel they use then starts with it.
    """
    client = redis_client_or_skip()
    prefix = unique_name(what) + ":"
    try:
        yield client, prefix
    finally:
        delete_keys(client, f"{prefix}*")
        client.close()
