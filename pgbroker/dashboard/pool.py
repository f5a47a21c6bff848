"""The dashboard's connections: one small pool per app, read-only friendly.

pgbroker's shared pools (:func:`pgbroker.database.pools.pool_for`) refuse a
role that may not write every table, which is right for workers and wrong
for a dashboard that only reads: an operator should be able to give it a
role with SELECT alone. So this pool checks only that the schema is there
and recent enough (migration 016 made the dashboard's indexes and
``sweeper_sessions``), and otherwise opens sessions as every pgbroker
session is opened: the first with :func:`pgbroker.database.sessions.connect`
(its clear errors, the password never shown), each pooled one pinned by
:func:`pgbroker.database.sessions.pin_session`. The actions, when on, check
the role's privileges themselves before writing
(:func:`pgbroker.dashboard.actions.may_act`) and run once
(``Settings.act``), never through :meth:`Pool.run`'s retry.

The pool opens on the first request (nothing connects at import or when
the app is built) and closes at interpreter exit, or with :func:`close_all`.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict

from pgbroker.database import pools
from pgbroker.database import schema as schema_mod
from pgbroker.database.sessions import connect, default_application_name, pin_session
from pgbroker.errors import SchemaError
from pgbroker.urls import to_conninfo

T = TypeVar("T")

#: The schema version whose tables and functions the pages read.
NEEDS_VERSION = 17
#: Sessions of one dashboard at most (a page runs its reads on one).
MAX_SIZE = 4

_open_pools: weakref.WeakSet[Pool] = weakref.WeakSet()
_registry_lock = threading.Lock()


class Pool:
    """The connections of one dashboard app."""

    def __init__(self, url: str, schema: str) -> None:
        self._url = url
        self._schema = schema
        self._lock = threading.Lock()
        self._pool: psycopg_pool.ConnectionPool | None = None

    def run(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """Run ``fn`` on a pooled connection; once more on a fresh one if that
        one was dead (the pages only read, so a read is safe to repeat)."""
        return pools.run_pooled(self.get, fn, "dashboard")

    def get(self) -> psycopg_pool.ConnectionPool:
        pool = self._pool
        if pool is not None:
            return pool
        with self._lock:
            if self._pool is None:
                self.check()
                conninfo = to_conninfo(self._url)
                kwargs: dict[str, Any] = {"autocommit": True}
                if "application_name" not in conninfo_to_dict(conninfo):
                    kwargs["application_name"] = default_application_name()
                self._pool = psycopg_pool.ConnectionPool(
                    conninfo,
                    kwargs=kwargs,
                    min_size=1,
                    max_size=MAX_SIZE,
                    open=True,
                    timeout=30,
                    name="pgbroker-dashboard",
                    configure=lambda conn: pin_session(conn, conninfo=conninfo),
                )
                with _registry_lock:
                    _open_pools.add(self)
            return self._pool

    def check(self) -> None:
        """Connect once: a wrong URL, a server down, no schema or an old one
        raise pgbroker's clear error (the password masked)."""
        with connect(self._url, connect_timeout=10) as conn:
            version = schema_mod.current_version(conn, self._schema)
            if version is None or version < NEEDS_VERSION:
                state = (
                    f"database {conn.info.dbname!r} has no pgbroker schema {self._schema!r}"
                    if version is None
                    else f"schema {self._schema!r} is at version {version}"
                )
                flag = "" if self._schema == "pgbroker" else f" --schema {self._schema}"
                raise SchemaError(
                    f"{state}; the dashboard needs version {NEEDS_VERSION} or later: run "
                    f"`pgbroker migrate --url URL{flag}` as the database owner"
                )

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()


def close_all() -> None:
    """Close the pool of every dashboard app of this process."""
    with _registry_lock:
        opened = list(_open_pools)
    for pool in opened:
        pool.close()


atexit.register(close_all)
