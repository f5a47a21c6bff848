"""A Celery result backend on PostgreSQL.

Configure it with the same URL as the broker (``postgresql://``,
``postgres://`` and ``pgbroker://`` all work)::

    result_backend = "postgresql://user:password@host:5432/dbname"
    result_backend_transport_options = {"schema": "pgbroker"}

It also works on its own, with a Redis or RabbitMQ broker.

Options (``result_backend_transport_options``; an unknown one is an error):

``schema`` (``"pgbroker"``)
    PostgreSQL schema of the tables (shared with the transport's tables
    when both use the same schema).
``auto_migrate`` (``True``)
    Create or upgrade the schema on first use; when off, a missing schema is
    an error telling to run ``pgbroker migrate``.
``max_result_size`` (16 MiB)
    Largest encoded result, in bytes. A larger one fails its task with
    :class:`~pgbroker.errors.ResultTooLarge` instead of being stored.
``cleanup_interval`` (``60``)
    Seconds between two expiry passes run by the backend itself, in a
    daemon thread of each process that stores results (one batch of deletes
    each, never on a task's path), so result tables stay bounded by
    ``result_expires`` without celery beat; the broker's sweeper also
    deletes expired results, a batch per sweep. ``0`` leaves deleting to
    ``celery.backend_cleanup`` and the sweeper. Either way a result past
    ``result_expires`` reads as PENDING at once, as on Redis: each row
    carries its ``expires_at`` and every read skips rows past it.
``pool_size`` (``4``)
    Largest number of connections in the per-process pool.

Tables (see ``migrations/002_results.sql``): ``task_result`` has one row per
task with the state, name, worker, queue, retries, parent/root/group ids,
timestamps and traceback as columns, so "which tasks failed in the last
hour" is one query::

    SELECT task_id, name, traceback FROM pgbroker.task_result
    WHERE state = 'FAILURE' AND date_done > now() - interval '1 hour';

``group_result`` holds saved groups; ``chord`` and ``chord_part`` count
native chords.

How it works:

* ``get()`` is woken by LISTEN/NOTIFY (:mod:`pgbroker.results.consumer`):
  the statement storing a result notifies the task's channel.
* Chords are native: each header part is recorded and counted in one
  statement, and the one that completes the count flips ``fired`` and sends
  the body (no ``celery.chord_unlock`` task, no polling).
* A SUCCESS row is never overwritten (enforced in the upsert).
* One small connection pool per process, replaced after fork; the LISTEN
  connection is separate.
* Round trips of a task (see ``_write_result``): the STARTED state is sent
  without waiting, in a transaction left open for up to
  ``STARTED_COMMIT_DELAY`` (2 ms). A task that stores its next state within
  that time commits both in one transaction: one WAL flush instead of two,
  and a waiter is still notified of both states, in order; the row itself
  never shows STARTED then. A longer task gets its STARTED committed on
  its own when the delay is up (by a daemon thread of the process). A state
  is announced only once committed, and SUCCESS is final, as before.
"""

from __future__ import annotations

import dataclasses
import difflib
import heapq
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from celery import states
from celery.backends.asynchronous import AsyncBackendMixin
from celery.backends.base import Backend, pending_results_t
from celery.canvas import maybe_signature
from celery.exceptions import ChordError
from celery.result import AsyncResult, GroupResult, allow_join_result, result_from_tuple
from celery.utils.functional import _regen
from kombu.serialization import dumps, loads

from pgbroker.appconfig import pgbroker_url
from pgbroker.broker import enqueue, finish
from pgbroker.broker import header as chord_header
from pgbroker.database import pipeline, pools, queries
from pgbroker.database.sessions import connect
from pgbroker.errors import ConfigurationError, ResultTooLarge, session_lost
from pgbroker.logs import recovery
from pgbroker.options import MAX_FIELD, checked, flag, schema_name, seconds, validated, whole
from pgbroker.results import run_times
from pgbroker.results.consumer import (
    ONE_WAITER_PER_ID,
    RESULT_COLUMNS,
    ManyWaiters,
    ResultConsumer,
    channel_for,
)
from pgbroker.results.finishing import FinishingBackend
from pgbroker.urls import SCHEMES, mask_password, to_conninfo

logger = logging.getLogger("pgbroker.results")

MiB = 1024 * 1024
#: group_index of a part sent without one (sorted last, as Redis does).
NO_INDEX = 2**31 - 1
#: Rows deleted per statement by expiry.
CLEANUP_BATCH = 1000


def _chord_error(message: str, cause: object) -> ChordError:
    """A ChordError whose __cause__ is the part's exception, as Celery 5.6+'s
    celery.backends.base._create_chord_error_with_cause makes it (a private
    helper that Celery 5.5 lacks)."""
    error = ChordError(message)
    if isinstance(cause, Exception):
        error.__cause__ = cause
    return error


T = TypeVar("T")


_WHERE = "result_backend_transport_options"


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    schema: str = checked("pgbroker", schema_name)
    auto_migrate: bool = checked(True, flag)
    max_result_size: int = checked(
        16 * MiB, partial(whole, minimum=1, maximum=MAX_FIELD, unit="bytes")
    )
    cleanup_interval: float = checked(
        60.0, partial(seconds, zero="0: left to celery.backend_cleanup")
    )
    # At least 2: a chord's last part holds one connection while it stores
    # the body's state through another.
    pool_size: int = checked(4, partial(whole, minimum=2, maximum=1000))

    @classmethod
    def from_mapping(cls, given: dict[str, Any]) -> BackendOptions:
        known = [f.name for f in dataclasses.fields(cls)]
        for name in given:
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigurationError(
                    f"{_WHERE}: unknown option {name!r}.{hint} "
                    f"pgbroker's result backend takes: {', '.join(known)} "
                    "(see pgbroker.results.backend)."
                )
        return validated(_WHERE, cls(**given))


# --- one pool per process (pgbroker.database.pools) ------------------------------------------


def _pool_for(url: str, options: BackendOptions) -> psycopg_pool.ConnectionPool:
    return pools.pool_for(
        url,
        options.schema,
        purpose="results",
        auto_migrate=options.auto_migrate,
        max_size=options.pool_size,
    )


# --- writes through libpq's pipeline --------------------------------------------------

#: How each store_result parameter is sent: (type oid, format: 0 text, 1 binary).
_TEXT, _BYTEA, _INT4, _TIMESTAMPTZ = (25, 0), (17, 1), (23, 0), (1184, 0)
_FLOAT8 = (701, 0)
_STORE_PARAMS = {
    "task_id": _TEXT,
    "state": _TEXT,
    "name": _TEXT,
    "args": _BYTEA,
    "kwargs": _BYTEA,
    "worker": _TEXT,
    "retries": _INT4,
    "queue": _TEXT,
    "parent_id": _TEXT,
    "root_id": _TEXT,
    "group_id": _TEXT,
    "result": _BYTEA,
    "content_type": _TEXT,
    "content_encoding": _TEXT,
    "traceback": _TEXT,
    "children": _BYTEA,
    "extra": _BYTEA,
    "date_done": _TIMESTAMPTZ,
    "received_at": _TIMESTAMPTZ,
    "started_at": _TIMESTAMPTZ,
    "retry_reason": _TEXT,
    "expires": _FLOAT8,
    "channel": _TEXT,
}
#: The prepared store_result statement, on connections that have it.
STORE_STATEMENT = b"pgbroker_store_result"
_prepared: weakref.WeakSet[psycopg.Connection] = weakref.WeakSet()


#: The outcome of a statement skipped because an earlier one in its
#: transaction failed.
_ABORTED = object()
#: A STARTED state waits this long for the task's next state, to commit
#: with it in one transaction (one WAL flush instead of two); a task still
#: running by then gets its STARTED committed on its own.
STARTED_COMMIT_DELAY = 0.002


class _Pipeline:
    """A pooled connection in pipeline mode, with statements whose replies
    are still to be read (at most one per thread; see ``_write_result``).

    Everything sent on it is sent under ``lock``: the committer thread may
    commit a deferred STARTED while its owner runs the task.
    """

    def __init__(self, pool: psycopg_pool.ConnectionPool, conn: psycopg.Connection) -> None:
        self.pool = pool
        self.conn = conn
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.labels: deque[str] = deque()  # statements sent, replies unread
        self.syncs = 0  # sync points sent, replies unread
        self.open = False  # a deferred statement waits for its commit (Sync)
        self.generation = 0  # counts deferred statements
        self.released = False  # back in the pool: no longer usable

    def send(self, label: str) -> None:
        self.labels.append(label)

    def sync(self) -> None:
        """Commit what was sent since the last sync (the reply is read later)."""
        pipeline.sync(self.conn)
        self.syncs += 1
        self.open = False
        self.flush()

    def flush(self) -> None:
        pipeline.flush(self.conn)

    def read_replies(self) -> list[tuple[str, Any]]:
        """Wait for every reply to what was synced: (label, outcome) per
        statement, in order; the outcome is None, an error or _ABORTED."""
        conn = self.conn
        outcomes: list[tuple[str, Any]] = []
        outcome: Any = None
        while self.syncs:
            res = pipeline.next_result(conn)
            if res is None:  # the end of one statement's replies
                outcomes.append((self.labels.popleft(), outcome))
                outcome = None
            elif pipeline.is_sync(res):
                self.syncs -= 1
            elif (failed := pipeline.error(conn, res)) is not None:
                outcome = failed
            elif pipeline.is_aborted(res):
                outcome = _ABORTED
        return outcomes

    def release(self) -> None:
        """Back to the pool, out of pipeline mode (or closed when unusable).
        Called with ``lock`` held."""
        self.released = True
        self.open = False
        conn = self.conn
        try:
            if not conn.closed:
                if self.syncs or self.labels:
                    conn.close()  # replies never read (an error on the way)
                else:
                    pipeline.leave(conn)
        except psycopg.Error:
            conn.close()
        self.pool.putconn(conn)


class _Committer:
    """Commits the deferred STARTED states that waited STARTED_COMMIT_DELAY
    (one daemon thread per process, started on first use).

    Adding a state does not wake the thread while it is active: it looks
    every STARTED_COMMIT_DELAY, so a STARTED state is committed between one
    and two delays after it was sent. Only after a second without work does
    it sleep until woken.
    """

    #: Seconds without work after which the thread sleeps until woken.
    IDLE_AFTER = 1.0

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.cond = threading.Condition()
        # (deadline, sequence, pipeline, generation), earliest first.
        self.due: list[tuple[float, int, _Pipeline, int]] = []
        self.added = 0
        self.sleeping = False
        self.waiting_until = 0.0  # the deadline of the thread's timed wait
        threading.Thread(target=self._run, name="pgbroker-started", daemon=True).start()

    def add(self, p: _Pipeline, generation: int) -> None:
        deadline = time.monotonic() + STARTED_COMMIT_DELAY
        with self.cond:
            self.added += 1
            heapq.heappush(self.due, (deadline, self.added, p, generation))
            if self.sleeping or deadline < self.waiting_until:
                self.cond.notify()

    def _run(self) -> None:
        last_work = time.monotonic()
        while True:
            with self.cond:
                now = time.monotonic()
                if not self.due:
                    if now - last_work > self.IDLE_AFTER:
                        self.sleeping = True
                        while not self.due:
                            self.cond.wait()
                        self.sleeping = False
                    else:
                        self.waiting_until = now + STARTED_COMMIT_DELAY
                        self.cond.wait(STARTED_COMMIT_DELAY)
                    continue
                last_work = now
                deadline, _, p, generation = self.due[0]
                if deadline > now:
                    self.waiting_until = deadline
                    self.cond.wait(deadline - now)
                    continue
                heapq.heappop(self.due)
            with p.lock:
                # Still open: the task runs longer than the delay. Commit,
                # and give the connection back to the pool for the rest of
                # the task (its owner takes another one for its next state).
                if p.open and p.generation == generation and not p.released:
                    outcomes: list[tuple[str, Any]] = []
                    try:
                        p.sync()
                        outcomes = p.read_replies()
                    except psycopg.Error as exc:
                        logger.warning("pgbroker: could not commit a STARTED state: %s", exc)
                    finally:
                        p.release()
                    PostgresBackend._log_outcomes(p, outcomes)


_committer: _Committer | None = None
_committer_lock = threading.Lock()


def _get_committer() -> _Committer:
    global _committer, _committer_lock
    if _committer is None or _committer.pid != os.getpid():
        if _committer is not None:  # the parent's, in a forked child: its thread is gone
            _committer, _committer_lock = None, threading.Lock()
        with _committer_lock:
            if _committer is None:
                _committer = _Committer()
    return _committer


# --- the backend --------------------------------------------------------------------

_EXTENDED = ("name", "args", "kwargs", "worker", "retries", "queue")
_BASE_META = {
    "status",
    "result",
    "traceback",
    "children",
    "date_done",
    "group_id",
    "parent_id",
    "task_id",
    *_EXTENDED,
}


def _flat(results: Any) -> bool:
    """Each part of a chord's header is one task, sent as one message (a
    chain's or a chord's result has a parent, a group's is a set)."""
    return (
        not isinstance(results, _regen)
        and bool(results)
        and all(isinstance(r, AsyncResult) and r.parent is None for r in results)
    )


#: Celery 5.5 and 5.6: 5.7's pending-result bookkeeping (ManyWaiters).
_Waiters: tuple[type, ...] = (ManyWaiters,) if ONE_WAITER_PER_ID else ()


class PostgresBackend(FinishingBackend, *_Waiters, Backend, AsyncBackendMixin):  # type: ignore[misc]
    """Celery result backend storing results in PostgreSQL tables."""

    ResultConsumer = ResultConsumer

    supports_native_join = True
    supports_autoexpire = False
    supports_failure_expires = False
    persistent = True

    def __init__(self, app: Any, url: str | None = None, **kwargs: Any) -> None:
        super().__init__(app, url=url, **kwargs)
        conf = self.app.conf
        url = url or self._url_from_conf(conf)
        to_conninfo(url)  # validates the scheme, without a password in errors
        self.url = url
        self.options = BackendOptions.from_mapping(
            dict(conf.get("result_backend_transport_options") or {})
        )
        self.schema = self.options.schema
        self.queries = queries.for_schema(self.schema, "backend.sql")
        self.extended = bool(conf.find_value_for_key("extended", "result"))
        # Expiry is ours when we run it ourselves; beat need not schedule it.
        self.supports_autoexpire = bool(self.options.cleanup_interval and self.expires)
        #: This thread's _Pipeline holding a write not waited for.
        self._held = threading.local()
        if ONE_WAITER_PER_ID:  # waiters by id, weak or not (ManyWaiters)
            self._pending_results = pending_results_t({}, {})
        self.result_consumer = self.ResultConsumer(
            self, self.app, self.accept, self._pending_results, self._pending_messages
        )
        self._offer_finishes()

    @staticmethod
    def _url_from_conf(conf: Any) -> str:
        # ``result_backend = "pgbroker"`` (no URL): reuse the broker's URL.
        broker = conf.broker_url or ""
        if isinstance(broker, str) and broker.partition("://")[0].lower() in SCHEMES:
            return broker
        raise ConfigurationError(
            "pgbroker result backend: give a URL, e.g. "
            "result_backend = 'postgresql://user:password@host:5432/dbname'"
        )

    def __reduce__(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = dict(kwargs or {}, url=self.url, expires=self.expires)
        return super().__reduce__(args, kwargs)

    def as_uri(self, include_password: bool = False) -> str:
        return self.url if include_password else mask_password(self.url)

    # --- connections -----------------------------------------------------------------

    def connect(self) -> psycopg.Connection:
        """A dedicated autocommit connection (the result consumer's LISTEN)."""
        self._pool()  # migrates on first use
        return connect(self.url, connect_timeout=10)

    def _pool(self) -> psycopg_pool.ConnectionPool:
        return _pool_for(self.url, self.options)

    def _run(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """Run ``fn`` on a pooled connection; once more if that one was dead."""
        self._settle()
        return pools.run_pooled(self._pool, fn, "result backend")

    def _fetchall(self, name: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        return self._run(lambda conn: conn.execute(self.queries[name], params).fetchall())

    def _execute(self, name: str, params: dict[str, Any]) -> None:
        self._run(lambda conn: conn.execute(self.queries[name], params))

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        return isinstance(exc, (psycopg.OperationalError, psycopg_pool.PoolTimeout))

    # --- encoding --------------------------------------------------------------------

    def _dump(self, value: Any) -> tuple[bytes, str, str]:
        content_type, content_encoding, payload = dumps(value, serializer=self.serializer)
        if isinstance(payload, str):
            payload = payload.encode(content_encoding or "utf-8")
        return payload, content_type, content_encoding

    def _load(self, data: bytes | None, content_type: str, content_encoding: str) -> Any:
        if data is None:
            return None
        return loads(
            bytes(data),
            content_type=content_type,
            content_encoding=content_encoding,
            accept=self.accept,
        )

    # --- task results ----------------------------------------------------------------

    def on_task_call(self, producer: Any, task_id: str) -> dict[str, Any]:
        # Nothing to do before the task is sent: a waiter LISTENs when it
        # starts waiting (get(), then()) and reads the state after its LISTEN
        # took effect, which misses nothing however late it comes (see
        # pgbroker.results.consumer). Listening here would cost every
        # delay() two statements, and the publish their time, even when
        # nobody ever waits.
        return {}

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request, format_date=False
        )
        payload, content_type, content_encoding = self._dump(result)
        if len(payload) > self.options.max_result_size:
            raise ResultTooLarge(
                f"the result of task {task_id} is {len(payload)} bytes encoded, larger than "
                f"the result backend's max_result_size ({self.options.max_result_size} "
                "bytes): return less data (store large data elsewhere and return a "
                "reference), or raise max_result_size in result_backend_transport_options"
            )
        extra = {k: v for k, v in meta.items() if k not in _BASE_META}
        children = meta.get("children")
        params = {
            "task_id": task_id,
            "state": state,
            "name": meta.get("name"),
            "args": self._dump(meta["args"])[0] if meta.get("args") is not None else None,
            "kwargs": self._dump(meta["kwargs"])[0] if meta.get("kwargs") is not None else None,
            "worker": meta.get("worker"),
            "retries": meta.get("retries"),
            "queue": meta.get("queue"),
            "parent_id": meta.get("parent_id"),
            "root_id": getattr(request, "root_id", None) if request else None,
            "group_id": meta.get("group_id"),
            "result": payload,
            "content_type": content_type,
            "content_encoding": content_encoding,
            # PostgreSQL text cannot hold U+0000, which an exception message
            # (and so its traceback) may: it is kept as the escape \x00. The
            # exception itself, in result, is stored exactly.
            "traceback": traceback.replace("\0", "\\x00") if traceback else traceback,
            "children": self._dump(children)[0] if children else None,
            "extra": self._dump(extra)[0] if extra else None,
            "date_done": meta.get("date_done"),
            "received_at": run_times.received_at(request),
            "started_at": run_times.started_at(request),
            "retry_reason": run_times.retry_reason(result) if state == states.RETRY else None,
            "expires": self._expires_seconds(),
            "channel": channel_for(self.schema, task_id),
        }
        # A run's outcome may commit with its chain's next link and its ack
        # (pgbroker.results.finishing); otherwise on its own. STARTED is
        # advisory: the task need not wait for it to be durable.
        if state not in states.READY_STATES or not self._write_finished(params):
            self._write_result(params, defer=state == states.STARTED)
        if state in states.READY_STATES:
            self._start_expiry()
        return result

    # --- pipelined writes ---------------------------------------------------------

    def _write_result(self, params: dict[str, Any], defer: bool) -> None:
        """Run store_result; with ``defer``, return once it is sent.

        A deferred write (STARTED) is sent in a transaction left open: the
        task's next state, if it comes within STARTED_COMMIT_DELAY, goes in
        the same transaction and commits both (one WAL flush; a waiter is
        notified of both states, in order). Otherwise the committer thread
        commits the STARTED state on its own when the delay is up, and
        gives the connection back to the pool. Until then the thread keeps
        the pooled connection; any other use of the backend by the thread
        first commits and confirms it (``_settle``).
        """
        for attempt in (1, 2):
            p, fresh = self._acquire_pipeline()
            outcomes: list[tuple[str, Any]] = []
            generation = 0
            try:
                if defer:
                    if p.open or p.syncs:
                        # An earlier STARTED whose task stored nothing
                        # after it: commit and confirm it first.
                        if p.open:
                            p.sync()
                        self._log_outcomes(p, p.read_replies())
                    self._send_store(p, params, "deferred")
                    p.open = True
                    p.generation += 1
                    generation = p.generation
                    p.flush()
                else:
                    self._send_store(p, params, "write")
                    p.sync()
                    outcomes = p.read_replies()
                    p.release()
            except psycopg.OperationalError as exc:
                p.release()
                p.lock.release()
                # A connection that died while idle in the pool (server
                # restart, pg_terminate_backend): once more on a fresh one.
                # The upsert is safe to repeat.
                if attempt == 2 or not fresh or not session_lost(exc):
                    raise
                logger.warning(
                    "pgbroker: result backend connection lost, retrying once",
                    extra=recovery("session_lost", reason=type(exc).__name__),
                )
                self._pool().check()  # its other idle sessions may be gone too
                continue
            except BaseException:
                p.release()
                p.lock.release()
                raise
            p.lock.release()
            if defer:
                self._held.p = p
                _get_committer().add(p, generation)
                return
            (_, ours), earlier = outcomes[-1], outcomes[:-1]
            self._log_outcomes(p, earlier)
            if ours is _ABORTED:
                # The deferred STARTED before it failed, and took this write
                # down with its transaction: this one alone, once more.
                self._write_result(params, defer=False)
            elif ours is not None:
                raise ours
            return

    def _acquire_pipeline(self) -> tuple[_Pipeline, bool]:
        """This thread's held pipeline, or a new one on a pooled connection
        (then True), with its lock held."""
        p: _Pipeline | None = getattr(self._held, "p", None)
        self._held.p = None
        if p is not None and p.pid == os.getpid():  # never the parent's, after fork
            p.lock.acquire()
            if not p.released:
                return p, False
            p.lock.release()  # committed and given back by the committer
        pool = self._pool()
        conn = pool.getconn()
        try:
            pipeline.enter(conn)
        except BaseException:
            pool.putconn(conn)
            raise
        p = _Pipeline(pool, conn)
        p.lock.acquire()
        return p, True

    def _settle(self) -> None:
        """Commit and confirm this thread's deferred write, if any, and
        release its connection."""
        p: _Pipeline | None = getattr(self._held, "p", None)
        self._held.p = None
        if p is None or p.pid != os.getpid():
            return
        outcomes: list[tuple[str, Any]] = []
        with p.lock:
            if p.released:
                return
            try:
                if p.open:
                    p.sync()
                outcomes = p.read_replies()
            except psycopg.Error as exc:
                logger.warning("pgbroker: could not confirm a STARTED state: %s", exc)
            finally:
                p.release()
        self._log_outcomes(p, outcomes)

    @staticmethod
    def _log_outcomes(p: _Pipeline, outcomes: list[tuple[str, Any]]) -> None:
        for label, outcome in outcomes:
            if label == "prepare" and outcome is not None:
                _prepared.discard(p.conn)  # prepared again next time
                logger.warning("pgbroker: could not prepare store_result: %s", outcome)
            elif label == "deferred" and outcome is not None and outcome is not _ABORTED:
                # STARTED is advisory: its failure is reported, not raised
                # into the task's next call.
                logger.warning("pgbroker: storing a STARTED state failed: %s", outcome)

    def _send_store(self, p: _Pipeline, params: dict[str, Any], label: str) -> None:
        conn = p.conn
        query, names = self._store_query()
        enc = conn.info.encoding
        values: list[bytes | None] = []
        types: list[int] = []
        formats: list[int] = []
        for name in names:
            oid, fmt = _STORE_PARAMS[name]
            value = params[name]
            if value is None:
                values.append(None)
            elif fmt == 1:
                values.append(bytes(value))
            elif oid == _TIMESTAMPTZ[0] and not isinstance(value, str):
                values.append(value.isoformat().encode())
            else:
                data = str(value).encode(enc)
                if b"\0" in data:
                    # libpq would cut the value at the NUL; psycopg refuses it too.
                    raise psycopg.DataError(
                        f"PostgreSQL text fields cannot contain NUL (0x00) bytes ({name})"
                    )
                values.append(data)
            types.append(oid)
            formats.append(fmt)
        if conn not in _prepared:
            # Prepared once per connection: planning the upsert costs more
            # than running it.
            pipeline.prepare(conn, STORE_STATEMENT, query, types)
            p.send("prepare")
            _prepared.add(conn)
        pipeline.send_prepared(conn, STORE_STATEMENT, values, formats)
        p.send(label)

    def _store_query(self) -> tuple[bytes, list[str]]:
        """store_result with $n placeholders, and the parameter name of each."""
        cached: tuple[bytes, list[str]] | None = getattr(self, "_store_query_cache", None)
        if cached is None:
            # Composed once per backend: this runs for every stored result.
            cached = pipeline.numbered(self.queries["store_result"].as_bytes(None))
            self._store_query_cache = cached
        return cached

    def _meta_from_row(self, row: tuple[Any, ...]) -> dict[str, Any]:
        r = dict(zip(RESULT_COLUMNS, row, strict=True))

        def load(data: bytes | None) -> Any:
            return self._load(data, r["content_type"], r["content_encoding"])

        meta: dict[str, Any] = {
            "task_id": r["task_id"],
            "status": r["state"],
            "result": load(r["result"]),
            "traceback": r["traceback"],
            "children": load(r["children"]) or [],
            "date_done": r["date_done"],
        }
        if r["group_id"] is not None:
            meta["group_id"] = r["group_id"]
        if r["parent_id"] is not None:
            meta["parent_id"] = r["parent_id"]
        if self.extended:
            meta.update(
                name=r["name"],
                args=load(r["args"]),
                kwargs=load(r["kwargs"]),
                worker=r["worker"],
                retries=r["retries"],
                queue=r["queue"],
            )
        if r["extra"] is not None:
            meta.update(load(r["extra"]))
        return self.meta_from_decoded(meta)  # type: ignore[no-any-return]

    def _get_task_meta_for(self, task_id: str) -> dict[str, Any]:
        rows = self._fetchall("get_result", {"task_id": task_id})
        if not rows:
            return {"task_id": task_id, "status": states.PENDING, "result": None}
        return self._meta_from_row(rows[0])

    def get_metas(self, task_ids: list[str]) -> list[dict[str, Any]]:
        """The stored meta of those of ``task_ids`` that have a row."""
        if not task_ids:
            return []
        rows = self._fetchall("get_results", {"task_ids": list(task_ids)})
        return [self._meta_from_row(row) for row in rows]

    def task_result_exists(self, task_id: str) -> bool:
        rows = self._fetchall("result_exists", {"task_id": task_id})
        return bool(rows[0][0])

    def _forget(self, task_id: str) -> None:
        self._execute("forget_result", {"task_id": task_id})

    def forget(self, task_id: str) -> None:
        super().forget(task_id)
        self.result_consumer.forget(task_id)

    def _wait_for_pending(
        self, result: Any, on_interval: Callable[[], None] | None = None, **kwargs: Any
    ) -> Iterator[None]:
        """Celery's wait, with ``on_interval`` called at least once.

        ``AsyncResult.get()`` raises a failed parent's error (follow_parents)
        by checking the parents before it waits and then through
        ``on_interval``, which Celery's loop calls only after a wait. A
        result found ready at the first look skips it: when the worker
        fails the parent and then this link (a chord body gets ChordError)
        between get()'s first check and that look, get() raised the link's
        error instead of the parent's, a race Redis's backend has too.
        """
        waited = False
        for _ in super()._wait_for_pending(result, on_interval=on_interval, **kwargs):
            waited = True
            yield
        if on_interval is not None and not waited:
            on_interval()

    def get_many(
        self,
        task_ids: Iterable[str],
        timeout: float | None = None,
        interval: float | None = 0.5,
        no_ack: bool = True,
        on_message: Callable[[dict[str, Any]], None] | None = None,
        on_interval: Callable[[], None] | None = None,
        max_iterations: int | None = None,
        READY_STATES: frozenset[str] = states.READY_STATES,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Ready results of ``task_ids``, one query per pass.

        ``join_native`` and ``GroupResult.get()`` wait through the result
        consumer (LISTEN/NOTIFY); this method is only their first look, and
        repeats at ``interval`` when a caller asks it to wait.
        """
        interval = 0.5 if interval is None else interval
        ids = set(task_ids)
        for task_id in list(ids):
            cached = self._cache.get(task_id)
            if cached is not None and cached["status"] in READY_STATES:
                ids.discard(task_id)
                yield task_id, cached
        iterations = 0
        started = time.monotonic()
        while ids:
            for meta in self.get_metas(sorted(ids)):
                if meta["status"] not in READY_STATES:
                    continue
                task_id = meta["task_id"]
                ids.discard(task_id)
                if meta["status"] == states.SUCCESS:
                    self._cache[task_id] = meta
                if on_message is not None:
                    on_message(meta)
                yield task_id, meta
            iterations += 1
            if not ids or (max_iterations and iterations >= max_iterations):
                break
            elapsed = time.monotonic() - started
            if timeout is not None and elapsed >= timeout:
                raise self.TimeoutError(f"Operation timed out ({timeout})")
            if on_interval:
                on_interval()
            time.sleep(interval if timeout is None else min(interval, timeout - elapsed))

    # --- groups ----------------------------------------------------------------------

    def _save_group(self, group_id: str, result: Any) -> Any:
        payload, content_type, content_encoding = self._dump(result.as_tuple())
        self._execute(
            "save_group",
            {
                "group_id": group_id,
                "result": payload,
                "content_type": content_type,
                "content_encoding": content_encoding,
                "expires": self._expires_seconds(),
            },
        )
        return result

    def _restore_group(self, group_id: str) -> dict[str, Any] | None:
        rows = self._fetchall("get_group", {"group_id": group_id})
        if not rows:
            return None
        data, content_type, content_encoding, date_done = rows[0]
        value = self._load(data, content_type, content_encoding)
        return {
            "result": result_from_tuple(value, self.app),
            "date_done": date_done,
            "task_id": group_id,
        }

    def _delete_group(self, group_id: str) -> None:
        self._execute("delete_group", {"group_id": group_id})

    # --- chords ----------------------------------------------------------------------

    def apply_chord(self, header_result_args: Any, body: Any, **kwargs: Any) -> None:
        self.ensure_chords_allowed()
        group_id, results = header_result_args[0], header_result_args[1]
        header = None
        # A header holding groups must be joined with its structure when the
        # chord completes (as the Redis backend does); a flat header's results
        # come from the recorded parts.
        if not isinstance(results, _regen) and any(isinstance(r, GroupResult) for r in results):
            header = self._dump(((group_id, None), [r.as_tuple() for r in results]))
        params = {"group_id": group_id, "header": header and header[0]}
        if (
            _flat(results)
            and enqueue.active_connection() is None
            and pgbroker_url(self.app.conf.broker_url) is not None
        ):
            # Sent with its header, in one transaction (pgbroker/broker/header.py):
            # pgbroker's transport sends the header, and it writes the row
            # where this backend is if not in its own database.
            chord_header.start(
                group_id,
                (self.queries["chord_start"], params),
                origin=lambda broker: finish.backend_origin(self, broker),
                run_elsewhere=self._run_statements,
            )
            return
        self._execute("chord_start", params)

    def set_chord_size(self, group_id: str, chord_size: int) -> None:
        params = {"group_id": group_id, "size": chord_size}
        if not chord_header.size_set(group_id, (self.queries["chord_set_size"], params)):
            self._execute("chord_set_size", params)

    def _run_statements(self, statements: list[tuple[Any, dict[str, Any]]]) -> None:
        def run(conn: psycopg.Connection) -> None:
            with conn.transaction():
                for statement, params in statements:
                    conn.execute(statement, params)

        self._run(run)

    def add_to_chord(self, group_id: str, result: Any) -> None:
        self._execute("chord_add", {"group_id": group_id})

    def on_chord_part_return(
        self, request: Any, state: str, result: Any, propagate: Any = None, **kwargs: Any
    ) -> None:
        task_id, group_id = request.id, request.group
        if not task_id or not group_id:
            return
        index = request.group_index
        payload, content_type, content_encoding = self._dump(self.encode_result(result, state))
        params = {
            "group_id": group_id,
            "task_id": task_id,
            "position": NO_INDEX if index is None else index,
            "state": state,
            "result": payload,
            "content_type": content_type,
            "content_encoding": content_encoding,
        }

        def record(conn: psycopg.Connection) -> None:
            # One transaction: if this process dies before sending the body,
            # fired rolls back and the redelivered part fires the chord.
            with conn.transaction():
                row = conn.execute(self.queries["chord_part_return"], params).fetchone()
                if row is None or not row[0]:
                    return
                self._fire_chord(conn, request, group_id, row[1])
                conn.execute(self.queries["chord_finish"], {"group_id": group_id})

        self._run(record)

    def _fire_chord(
        self, conn: psycopg.Connection, request: Any, group_id: str, header: bytes | None
    ) -> None:
        app = self.app
        callback = maybe_signature(request.chord, app=app)
        # Celery 5.6 freezes a chord's body with its header's group id; 5.5
        # does not, and the body's result would not be in the group (the
        # dashboard's canvas finds the chord by it). Set as 5.6 does.
        callback.options.setdefault("group_id", group_id)
        try:
            if header is not None:
                value = self._load(header, self.content_type, self.content_encoding)
                header_result = result_from_tuple(value, app)
                header_result.on_ready()
                with allow_join_result():
                    resl = header_result.join_native(
                        timeout=app.conf.result_chord_join_timeout, propagate=True
                    )
            else:
                rows = conn.execute(self.queries["chord_parts"], {"group_id": group_id})
                resl = [self._unpack_part(*row) for row in rows.fetchall()]
        except ChordError as exc:
            logger.exception("Chord %r raised: %r", group_id, exc)
            self.chord_error_from_stack(callback, exc)
            return
        except Exception as exc:
            logger.exception("Chord %r raised: %r", group_id, exc)
            self.chord_error_from_stack(
                callback,
                _chord_error(f"Dependency raised {exc!r}", exc),
            )
            return
        try:
            # Celery 5.7 publishes chord callbacks through AMQP._retry_publish
            # (each message retried on its own); 5.5 and 5.6 have no such
            # method and their own backends call callback.delay directly.
            retry_publish = getattr(app.amqp, "_retry_publish", None)
            if retry_publish is not None:
                retry_publish(callback.delay, resl)
            else:
                callback.delay(resl)
        except Exception as exc:
            logger.exception("Chord callback for %r raised: %r", group_id, exc)
            self.chord_error_from_stack(callback, ChordError(f"Callback error: {exc!r}"))

    def _unpack_part(
        self,
        task_id: str,
        state: str,
        data: bytes | None,
        content_type: str,
        content_encoding: str,
    ) -> Any:
        value = self._load(data, content_type, content_encoding)
        if state in states.EXCEPTION_STATES:
            value = self.exception_to_python(value)
        if state in states.PROPAGATE_STATES:
            raise _chord_error(f"Dependency {task_id} raised {value!r}", value)
        return value

    # --- expiry ----------------------------------------------------------------------

    def _expires_seconds(self) -> float | None:
        """result_expires in seconds, stored with each row (None: never)."""
        return float(self.expires) if self.expires else None

    def cleanup(self) -> int:
        """Remove one batch each of results, groups and chords older than
        ``result_expires`` (Celery's ``backend_cleanup`` task calls this too).
        Readers already treat expired rows as missing: deleting them is only
        about space, so a backlog goes a batch per pass, never all at once.
        Returns the number of rows deleted."""
        if not self.expires:
            return 0
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=float(self.expires))
        params = {"cutoff": cutoff, "batch": CLEANUP_BATCH}
        deleted = 0
        for name in ("cleanup_results", "cleanup_groups", "cleanup_chords"):
            query = self.queries[name]

            def delete(conn: psycopg.Connection, query: Any = query) -> int:
                return conn.execute(query, params).rowcount

            deleted += self._run(delete)
        return deleted

    def _start_expiry(self) -> None:
        """Start this process's expiry thread for (URL, schema), once: it
        runs :meth:`cleanup` every ``cleanup_interval``, whether or not new
        results come (a forked child starts its own). It holds the backend
        weakly and ends once the backend is gone or the pools are closed
        (worker shutdown, exit); the next result stored starts it again."""
        if not self.options.cleanup_interval or not self.expires:
            return
        key = (self.url, self.schema)
        running = _expiry_threads.get(key)
        if running is not None and running[0].is_alive() and not running[1].is_set():
            return
        with _expiry_lock:
            running = _expiry_threads.get(key)
            if running is None or not running[0].is_alive() or running[1].is_set():
                stop = threading.Event()
                thread = threading.Thread(
                    target=_expire_forever,
                    args=(weakref.ref(self), float(self.options.cleanup_interval), stop),
                    name=f"pgbroker-result-expiry[{self.schema}]",
                    daemon=True,
                )
                _expiry_threads[key] = (thread, stop)
                thread.start()


def _expire_forever(
    ref: weakref.ReferenceType[PostgresBackend], interval: float, stop: threading.Event
) -> None:
    """The expiry thread: holds its backend only while a pass runs."""
    while not stop.wait(interval):
        backend = ref()
        if backend is None:
            return  # its app is gone
        try:
            backend.cleanup()
        except Exception as exc:  # a daemon thread: log, try again next time
            if stop.is_set():
                return  # the pools were closed under this pass: shutting down
            logger.warning("pgbroker: result expiry failed: %s", exc)
        finally:
            del backend


def _stop_expiry(purpose: str | None = None) -> None:
    """Stop the expiry threads (the pools they use are being closed)."""
    if purpose not in (None, "results"):
        return
    with _expiry_lock:
        running = list(_expiry_threads.values())
        _expiry_threads.clear()
    for _thread, stop in running:
        stop.set()


#: The expiry thread of each (URL, schema) in this process, and its stop.
_expiry_threads: dict[tuple[str, str], tuple[threading.Thread, threading.Event]] = {}
_expiry_lock = threading.Lock()
pools.on_close(_stop_expiry)
