"""Queue lengths for Flower's Broker page and ``/api/queues/length``.

Flower (2.x) reads queue lengths through ``flower.utils.broker.Broker``,
which picks a class by the broker URL's scheme and knows only RabbitMQ and
Redis: for any other URL both views answer 404 "broker is not supported".
:func:`install` teaches it pgbroker's schemes. Flower runs its
configuration file (``flowerconfig.py`` in the working directory, or
``--conf=PATH``) as Python before it starts, so two lines there are enough::

    # flowerconfig.py
    from pgbroker.flower import install
    install()

Nothing else changes: this module is imported only by that file (never by
pgbroker's autoload), and other broker URLs still go to Flower's own
classes.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

from pgbroker.operations import admin

SCHEMES = ("postgresql", "postgres", "pgbroker")


class PgBrokerQueues:
    """Flower's broker interface (``async queues(names)``) over pgbroker's
    ``queue_stats`` query, with the fields Flower's Broker page shows."""

    def __init__(self, broker_url: str, *_: Any, **kwargs: Any) -> None:
        self.url = broker_url
        options = kwargs.get("broker_options") or {}
        self.schema = str(options.get("schema", "pgbroker"))

    async def queues(self, names: list[str]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._queues, list(names))

    def _queues(self, names: list[str]) -> list[dict[str, Any]]:
        with admin.open_connection(self.url, self.schema, connect_timeout=5) as conn:
            stats = {q.name: q for q in admin.queue_stats(conn, self.schema)}
        out = []
        for name in names:
            q = stats.get(name)
            ready, reserved, delayed = (q.ready, q.reserved, q.delayed) if q else (0, 0, 0)
            out.append(
                {
                    "name": name,
                    # As RabbitMQ counts: ready plus unacknowledged; delayed
                    # (countdown/ETA) messages wait in the table too.
                    "messages": ready + reserved + delayed,
                    "messages_ready": ready,
                    "messages_unacknowledged": reserved,
                    "messages_delayed": delayed,
                    "consumers": q.consumers if q else 0,
                }
            )
        return out


def install() -> None:
    """Make Flower's ``Broker(url)`` answer pgbroker URLs (idempotent)."""
    from flower.utils import broker as flower_broker

    cls = flower_broker.Broker
    if getattr(cls, "_pgbroker_installed", False):
        return
    original = cls.__new__

    def __new__(klass: type, broker_url: str, *args: Any, **kwargs: Any) -> Any:
        if urlsplit(broker_url).scheme in SCHEMES:
            return PgBrokerQueues(broker_url, *args, **kwargs)
        return original(klass, broker_url, *args, **kwargs)

    cls.__new__ = staticmethod(__new__)
    cls._pgbroker_installed = True
