"""One small connection pool per process and purpose, safe across fork.

The result backend, durable steps and the beat scheduler each keep a pool
per (URL, schema) in every process. After a fork the child must not use or
close the parent's connections (see :mod:`pgbroker.database.forking`): it detaches
them and opens its own pool on first use.

Pools are closed when a Celery worker (or pool process) shuts down, and at
interpreter exit: a pool left to its finaliser would stop its worker
threads while the interpreter is tearing down, which under gevent and
eventlet (threads are green) prints ``Exception ignored in:
ConnectionPool.__del__ ... greenlet is being finalized``.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict

from pgbroker.database import schema
from pgbroker.database.forking import neutralise
from pgbroker.database.sessions import connect, default_application_name, pin_session
from pgbroker.errors import DatabaseUnavailable, session_lost
from pgbroker.logs import recovery
from pgbroker.urls import to_conninfo

logger = logging.getLogger("pgbroker.database")
T = TypeVar("T")

_pools: dict[tuple[str, str, str], psycopg_pool.ConnectionPool] = {}
_lock = threading.Lock()
_conns: weakref.WeakSet[psycopg.Connection] = weakref.WeakSet()
#: Pools inherited through fork, kept referenced so that their finalisers
#: never run in the child.
_inherited: list[psycopg_pool.ConnectionPool] = []
#: Called by close_pools with its ``purpose``, before closing: what works
#: with the pools in the background (the result backend's expiry) stops.
_close_hooks: list[Callable[[str | None], None]] = []


def on_close(hook: Callable[[str | None], None]) -> None:
    """Have ``hook(purpose)`` called whenever close_pools runs."""
    if hook not in _close_hooks:
        _close_hooks.append(hook)


def pool_for(
    url: str, schema_name: str, *, purpose: str, auto_migrate: bool, max_size: int = 4
) -> psycopg_pool.ConnectionPool:
    """The process's pool for ``purpose`` on (url, schema), opened on first use.

    The first connection is opened directly, so that a wrong URL or a server
    that is down gives pgbroker's clear error at once rather than a pool
    timeout later; it also creates or checks the schema.
    """
    key = (url, schema_name, purpose)
    pool = _pools.get(key)
    if pool is not None:
        return pool
    with _lock:
        pool = _pools.get(key)
        if pool is None:
            _check_schema(url, schema_name, auto_migrate)
            conninfo = to_conninfo(url)
            kwargs: dict[str, Any] = {"autocommit": True}
            if "application_name" not in conninfo_to_dict(conninfo):
                kwargs["application_name"] = default_application_name()
            pool = psycopg_pool.ConnectionPool(
                conninfo,
                kwargs=kwargs,
                min_size=1,
                max_size=max_size,
                open=True,
                timeout=30,
                name=f"pgbroker-{purpose}",
                configure=functools.partial(_configure, conninfo),
            )
            _pools[key] = pool
            _close_at_shutdown()
    return pool


def _configure(conninfo: str, conn: psycopg.Connection) -> None:
    """A new pooled session: pin its settings as every pgbroker session's
    (pgbroker.database.sessions.pin_session), and track it for fork."""
    pin_session(conn, conninfo=conninfo)
    _conns.add(conn)


def _check_schema(url: str, schema_name: str, auto_migrate: bool) -> None:
    for attempt in (1, 2):
        try:
            with connect(url, connect_timeout=10) as conn:
                if auto_migrate:
                    schema.migrate(conn, schema_name)
                else:
                    schema.require_current(conn, schema_name)
                return
        except psycopg.OperationalError as exc:
            # A session ended by the server just after it started (restart,
            # pg_terminate_backend): once more; both are safe to repeat. A
            # failure to connect at all already carries its explanation.
            if attempt == 2 or isinstance(exc, DatabaseUnavailable) or not session_lost(exc):
                raise


def run_pooled(
    pool: Callable[[], psycopg_pool.ConnectionPool],
    fn: Callable[[psycopg.Connection], T],
    what: str,
) -> T:
    """Run ``fn`` on a connection of ``pool()``; once more on a fresh one if
    that one was dead (it died while idle in the pool: a server restart,
    pg_terminate_backend), as ``fn`` must be safe to repeat. ``what`` names
    the user in the log line ("result backend")."""
    for attempt in (1, 2):
        try:
            with pool().connection() as conn:
                return fn(conn)
        except psycopg.OperationalError as exc:
            if attempt == 2 or not session_lost(exc):
                raise
            logger.warning(
                "pgbroker: %s connection lost, retrying once",
                what,
                extra=recovery("session_lost", reason=type(exc).__name__),
            )
            pool().check()  # its other idle sessions may be gone too
    raise AssertionError("unreachable")


def close_pools(purpose: str | None = None) -> None:
    """Close this process's pools (all, or those of one purpose)."""
    with _lock:
        keys = [k for k in _pools if purpose is None or k[2] == purpose]
        pools = [_pools.pop(k) for k in keys]
    for hook in list(_close_hooks):
        hook(purpose)
    for pool in pools:
        pool.close()


def _close_on_signal(**_: Any) -> None:
    close_pools()


_shutdown_hooked = False


def _close_at_shutdown() -> None:
    """Close the pools when the worker stops (before its pool's greenlets
    or threads are gone) and, failing that, at exit."""
    global _shutdown_hooked
    if _shutdown_hooked:
        return
    _shutdown_hooked = True
    from celery import signals

    signals.worker_shutdown.connect(
        _close_on_signal, weak=False, dispatch_uid="pgbroker.database.pools"
    )
    signals.worker_process_shutdown.connect(
        _close_on_signal, weak=False, dispatch_uid="pgbroker.database.pools"
    )
    atexit.register(close_pools)


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    for conn in list(_conns):
        neutralise(conn)
    _inherited.extend(_pools.values())
    _pools.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def close_app(app: Any) -> None:
    """Close what a Celery app holds open, for programs that make and drop
    apps (tests, the demo, the compat suite).

    Celery's ``app.close()`` only forgets the app's broker pool, which is
    Kombu's process-wide pool for the broker URL (``kombu.pools``), and
    leaves the result consumer's LISTEN session open. This closes both and
    removes the closed pools from Kombu's registry: left there, the next app
    on the same URL in the process gets "Acquire on closed pool".
    """
    import kombu.pools

    with contextlib.suppress(Exception):  # a backend without a consumer
        app.backend.result_consumer.stop()
    with contextlib.suppress(Exception):
        if app._pool is not None:
            app._pool.force_close_all()
    with contextlib.suppress(Exception):
        app.close()
    for group in (kombu.pools.producers, kombu.pools.connections):
        for key, pool in list(group.items()):
            # A producer pool is unusable once its connection pool is closed.
            if pool._closed or getattr(getattr(pool, "connections", None), "_closed", False):
                dict.pop(group, key, None)
