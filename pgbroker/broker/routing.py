"""Routing: AMQP topic binding keys as PostgreSQL regular expressions, and
the per-session cache of resolved routes.

A routing key is matched as ``'.' || routing_key ~ pattern``: with the dot
prepended, every word is introduced by a dot, which makes ``#`` (zero or
more words) easy to express.

``publish`` (:file:`sql/queries.sql`) stores a message in the queues of
the publisher's cached route when its routing version is still the current
one (015_routing_version.sql); otherwise, or with no route cached,
``publish_routing`` resolves it in SQL, and :class:`RouteCache` keeps the
route it returns.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import NamedTuple


def topic_pattern(binding_key: str) -> str:
    parts = []
    for word in binding_key.split("."):
        if word == "#":
            parts.append(r"(\.[^.]*)*")
        elif word == "*":
            parts.append(r"\.[^.]*")
        else:
            # re.escape puts a backslash before every non-alphanumeric
            # character, which PostgreSQL's regex flavour also reads as a literal.
            parts.append(r"\." + re.escape(word))
    return "^" + "".join(parts) + "$"


def routing_channel_for(schema: str) -> str:
    """The NOTIFY channel on which every change of ``schema``'s routing
    tables is announced (015_routing_version.sql)."""
    return "pgbr_" + hashlib.md5(schema.encode(), usedforsecurity=False).hexdigest()


class Route(NamedTuple):
    """Where a message to one (exchange, routing key) goes, as resolved by
    ``publish_routing`` at routing ``version``: the target queues and each one's
    message_ttl in seconds (None: none)."""

    version: int
    queues: tuple[str, ...]
    ttls: tuple[float | None, ...]


class RouteCache:
    """Routes resolved by ``publish_routing``, per (exchange, routing key),
    all at one routing version (docs/delivery.md, "Routing from a cache").

    Using a stale route is always safe for a statement: ``publish`` checks
    the version in its own snapshot and stores nothing when it is not the
    current one (then ``publish_routing`` routes in SQL). Deciding *without*
    a statement (a transient message that routes nowhere) is only safe
    while the cache is ``watched``: the session
    LISTENs on the routing channel, every route was learned after the
    LISTEN, and every notification that arrived has been read (``forget``
    on each one).
    """

    #: Routes kept at most (topic exchanges can have many routing keys).
    MAX_ROUTES = 4096

    def __init__(self) -> None:
        self.version: int | None = None
        self._routes: dict[tuple[str, str], Route] = {}
        #: Exchanges without any binding at this version: every key routes nowhere.
        self._unbound: set[str] = set()
        #: Bumped by each forget(): a route resolved by a statement during
        #: which a notification was read is not learned.
        self.epoch = 0
        #: The session LISTENs on the routing channel (set by the transport).
        self.watched = False

    def lookup(self, exchange: str, routing_key: str) -> Route | None:
        route = self._routes.get((exchange, routing_key))
        if route is None and exchange in self._unbound and self.version is not None:
            return Route(self.version, (), ())
        return route

    def learn(
        self,
        epoch: int,
        version: int,
        exchange: str,
        routing_key: str,
        queues: Sequence[str],
        ttls: Sequence[float | None],
        unbound: bool = False,
    ) -> None:
        """Keep a route ``publish`` resolved at ``version``, unless the
        cache was forgotten since ``epoch`` (read before the statement).
        ``unbound``: the exchange had no binding at all then."""
        if epoch != self.epoch:
            return
        if version != self.version or len(self._routes) >= self.MAX_ROUTES:
            self._routes.clear()
            self._unbound.clear()
            self.version = version
        self._routes[(exchange, routing_key)] = Route(version, tuple(queues), tuple(ttls))
        if unbound:
            self._unbound.add(exchange)

    def forget(self) -> None:
        """The routing tables changed (a notification): drop every route."""
        self._routes.clear()
        self._unbound.clear()
        self.version = None
        self.epoch += 1
