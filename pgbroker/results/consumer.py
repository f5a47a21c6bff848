"""Push-based ``get()``: wake waiters with LISTEN/NOTIFY instead of polling.

Each task has its own notification channel (``channel_for``), so the server
forwards a client only the notifications of the tasks it waits for. The
worker's ``store_result`` statement notifies the channel at commit, with the
stored row itself as payload when it fits (see ``store_result`` in
``sql/backend.sql``): a small result reaches its waiter without a query.

Round trips. The consumer's connection runs in libpq's pipeline mode, so
that nothing it sends has to wait for its reply:

* ``consume_from`` (Celery's ``add_pending_result``: ``get()``, ``then()``,
  building a ``ResultSet``) only notes the task's channel. Nothing is sent
  when a task is published (``on_task_call``) either, so a client that
  never waits pays nothing, and the publish never waits behind a LISTEN.
* When a wait starts (``on_wait_for_pending``, or any ``drain_events``), the
  channels noted since go out at once: one transaction with their
  ``LISTEN``s, then a second one with ONE read of all their rows
  (``get_results_json``), in one round trip. A ``ResultSet.get()`` of 5,000
  tasks costs 5,000 LISTENs and one read, in two transactions.
* The wait then takes those replies. That is all a waiter needs: a state
  committed before the read is in the read, one committed after the LISTEN
  is notified, and the read starts after the LISTEN committed.
* While nothing happens, a waiting ``get()`` waits on the socket and sends
  no query at all.
* A finished task's channel is not UNLISTENed at once: the stale channels
  are dropped in bulk (``UNLISTEN *`` and the LISTENs of those still
  waited for, one transaction) once they outnumber the live ones and
  ``STALE_MAX`` (see ``_sync_listens``). Notifications on them are ignored.
* Except after ``forget()``: its id may be used again, so its channel is
  left at once (one round trip) and what arrived of it is dropped.

Modelled on Celery's Redis ``ResultConsumer``: one thread at a time reads
the connection; the others wait on a condition the reader signals after it
has delivered what it read.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import select
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from datetime import datetime
from queue import Empty
from typing import TYPE_CHECKING, Any

import celery
import psycopg
from celery import states
from celery.backends.asynchronous import BaseResultConsumer
from celery.result import ResultSet
from psycopg import sql
from psycopg.adapt import PyFormat, Transformer

from pgbroker.database import pipeline
from pgbroker.database.forking import neutralise

if TYPE_CHECKING:
    from pgbroker.results.backend import PostgresBackend

logger = logging.getLogger("pgbroker.results")

#: Longest time spent in one wait on the socket, so that a reconnect by
#: another thread or a stop request is noticed.
MAX_WAIT = 1.0
#: Longest wait for the replies to LISTEN after a reconnect.
RECONNECT_TIMEOUT = 30.0
#: How long a lost connection is tried again before the waiting ``get()``
#: fails (Celery's RuntimeError), in seconds: long enough for a failover
#: (Patroni's default ttl is 30 s) or a server restart. The waits between
#: attempts grow from RECONNECT_FIRST_WAIT to MAX_WAIT.
RECONNECT_PATIENCE = 60.0
RECONNECT_FIRST_WAIT = 0.1
#: Stale channels (finished tasks, still LISTENed) are dropped once there are
#: at least this many, and ``STALE_RATIO`` times as many as live ones: then
#: ``UNLISTEN *`` plus the live LISTENs is a fraction of one UNLISTEN each.
#: Until then they only cost the server a string comparison per channel in
#: each notification it checks for this session.
STALE_MAX = 1000
STALE_RATIO = 4

_TEXT_ARRAY_OID = 1009
_READ_STATEMENT = b"pgbroker_get_results_json"
#: In the queue of replies expected from the pipeline: a sync point.
_SYNC = object()
#: In the queue of replies expected from the pipeline: a command (LISTEN...).
_COMMAND = object()


def _close_owned(conn: psycopg.Connection, pid: int) -> None:
    """The finaliser of a consumer's LISTEN connection: its consumer is gone
    (or the interpreter exits). Closed in the process that opened it; in a
    forked child only detached, since closing would end the parent's session."""
    if os.getpid() == pid:
        with contextlib.suppress(Exception):
            conn.close()
    else:
        neutralise(conn)


def channel_for(schema: str, task_id: str) -> str:
    """The NOTIFY channel of one task: short, fixed length, schema-specific."""
    digest = hashlib.md5(f"{schema}/{task_id}".encode(), usedforsecurity=False).hexdigest()
    return "pgr_" + digest


#: The columns of a stored result as get_result, get_results and
#: get_results_json (sql/backend.sql) return them, in order.
RESULT_COLUMNS = (
    "task_id",
    "state",
    "result",
    "content_type",
    "content_encoding",
    "traceback",
    "children",
    "date_done",
    "name",
    "args",
    "kwargs",
    "worker",
    "retries",
    "queue",
    "parent_id",
    "root_id",
    "group_id",
    "extra",
)
#: The bytea columns, which JSON carries in base64.
_BYTEA = frozenset({"result", "children", "args", "kwargs", "extra"})


def row_from_json(values: list[Any]) -> tuple[Any, ...]:
    """A ``get_results_json`` array as the row ``PostgresBackend`` decodes."""
    return tuple(
        _b64(value)
        if column in _BYTEA
        else datetime.fromisoformat(value)
        if column == "date_done" and value is not None
        else value
        for column, value in zip(RESULT_COLUMNS, values, strict=True)
    )


def _b64(value: str | None) -> bytes | None:
    # PostgreSQL's base64 has a newline every 76 characters; b64decode skips them.
    return None if value is None else base64.b64decode(value)


def _fire_if_complete(result: ResultSet) -> None:
    """Fire the readiness of a set whose every member is ready.

    A ``ResultSet`` learns that it is ready from a vine ``barrier`` over its
    members' ``on_ready`` promises, and such a barrier never fires for a
    member fulfilled while the barrier is being built: it counts it, but
    only fires on a later member (``barrier.__call__`` checks ``finalized``,
    and ``finalize()`` does nothing once the constructor set it). Members are
    fulfilled during that construction when their state is already known:
    ``add_pending_result`` takes it from Celery's message buffer (or a
    ``drain_events`` run by another thread delivers the read it sent). If
    that happens to every member, the set's ``get()`` would wait on a
    promise nothing fulfils, to its timeout.
    """
    for member in result.results:
        if isinstance(member, ResultSet):
            _fire_if_complete(member)  # a nested group has its own barrier
    full = getattr(result, "_on_full", None)
    if full is None or full.ready or full.cancelled or not full.finalized:
        return
    if result.on_ready.ready:
        return
    if all(getattr(member.on_ready, "ready", False) for member in result.results):
        full.ready = True
        full.p(*full.args, **full.kwargs)


#: Celery 5.5 and 5.6 keep one result object per waited task id: a second
#: AsyncResult of the same id is never woken (a group member decoded from a
#: parent's children holds the id), and any one's ``__del__`` ends the wait
#: of all (Celery issue #4925, fixed in 5.7). ``ManyWaiters`` and
#: ``ResultConsumer.on_state_change`` bring 5.7's bookkeeping to them.
ONE_WAITER_PER_ID = celery.VERSION[:2] < (5, 7)


def _waiting_on(pending_results: Any, task_id: str) -> list[Any]:
    return [r for mapping in pending_results for r in list(mapping.get(task_id, {}).values())]


class ManyWaiters:
    """Celery 5.7's ``AsyncBackendMixin`` pending-result methods (each task id
    maps to its waiters), for ``PostgresBackend`` on Celery 5.5 and 5.6."""

    _pending_results: Any
    result_consumer: Any

    def _add_pending_result(self, task_id: str, result: Any, weak: bool = False) -> None:
        if any(r is result for r in _waiting_on(self._pending_results, task_id)):
            return
        concrete, weak_ = self._pending_results
        mapping, waiters = (weak_, weakref.WeakValueDictionary) if weak else (concrete, dict)
        mapping.setdefault(task_id, waiters())[id(result)] = result
        self.result_consumer.consume_from(task_id)

    def remove_pending_result(self, result: Any) -> Any:
        if not self._remove_pending_result(result):
            self.result_consumer.cancel_for(result.id)  # on_result_fulfilled
        return result

    def _remove_pending_result(self, result: Any) -> list[Any]:
        for mapping in self._pending_results:
            waiters = mapping.get(result.id)
            if waiters is None:
                continue
            if waiters.get(id(result)) is result:
                waiters.pop(id(result), None)
            if not waiters:
                mapping.pop(result.id, None)
        return _waiting_on(self._pending_results, result.id)


class ResultConsumer(BaseResultConsumer):  # type: ignore[misc]
    backend: PostgresBackend

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connection_errors = (psycopg.OperationalError,)
        self._reset()

    if not hasattr(BaseResultConsumer, "reconnect_on_error"):
        # Celery 5.5: BaseResultConsumer.reconnect_on_error (which calls
        # _reconnect on a connection error) came in 5.6; the same here.
        @contextlib.contextmanager
        def reconnect_on_error(self) -> Iterator[None]:
            try:
                yield
            except self._connection_errors:
                try:
                    self._reconnect()
                except self._connection_errors as exc:
                    message = (
                        "Retry limit exceeded while trying to reconnect to the Celery "
                        "result store backend. The Celery application must be restarted."
                    )
                    logger.critical(message)
                    raise RuntimeError(message) from exc

    def _reset(self) -> None:
        self._lock = threading.RLock()
        self._read_done = threading.Condition(self._lock)
        self._reader = False
        self._connection: psycopg.Connection | None = None
        #: Closes _connection when this consumer is collected (an app
        #: dropped without stopping its backend's consumer: Celery's
        #: ``app.close()`` does not); it holds the connection, not us.
        self._finalizer: weakref.finalize[..., ResultConsumer] | None = None
        self._pid = os.getpid()
        #: Counts stop() calls: a reconnect in progress gives up at one.
        self._stops = 0
        #: channel -> task id, for every channel we LISTEN on (or will).
        self._channels: dict[str, str] = {}
        #: channels whose LISTEN was sent on the current connection (stale
        #: ones included).
        self._listening: set[str] = set()
        #: channels of _channels whose LISTEN is still to send.
        self._to_listen: set[str] = set()
        #: channels of _listening no longer wanted, not UNLISTENed yet.
        self._stale: set[str] = set()
        #: channels cancelled, to leave when the lock is next taken; never blocks.
        self._pending_unlisten: set[str] = set()
        #: replies still expected from the pipeline, in order: _COMMAND, a
        #: list of task ids (the read of their rows) or _SYNC.
        self._inflight: deque[object] = deque()
        self._sent = 0  # sync points sent
        self._synced = 0  # sync points whose reply arrived
        #: task id -> the sync point after which the read that followed its
        #: LISTEN has arrived; taken by the first wait on that task.
        self._initial: dict[str, int] = {}
        #: tasks whose read failed (the wait reads again, and reports).
        self._failed_reads: set[str] = set()
        #: (task id, payload) read or notified, not yet delivered; payload
        #: None is a read that found no row.
        self._incoming: deque[tuple[str, str | None]] = deque()

    # --- connection -----------------------------------------------------------------

    def _conn(self) -> psycopg.Connection:
        """The LISTEN connection of this process (caller holds the lock)."""
        conn = self._connection
        if conn is None:
            conn = self.backend.connect()
            if self._finalizer is not None:
                self._finalizer()  # closes a connection dropped without it
            self._finalizer = weakref.finalize(self, _close_owned, conn, os.getpid())
            pipeline.enter(conn)
            self._connection = conn
            self._listening = set()
            self._stale = set()
            self._to_listen = set(self._channels)
            self._inflight.clear()
            self._synced = self._sent
            # Prepared once: parsing the read costs more than running it.
            query = self.backend.queries["get_results_json"].as_bytes(conn)
            pipeline.prepare(conn, _READ_STATEMENT, query, [_TEXT_ARRAY_OID])
            self._inflight.append(_COMMAND)
            self._sync(conn)
        elif conn.closed:
            raise psycopg.OperationalError("pgbroker: the LISTEN connection is closed")
        return conn

    def _drop_finalizer(self) -> None:
        """Forget the finaliser of a connection closed or detached by us."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def _forget_inherited(self) -> None:
        # The parent's connection must not be used or closed here: closing
        # it would end the parent's session.
        if self._connection is not None:
            neutralise(self._connection)
        self._drop_finalizer()
        self._reset()

    def _check_fork(self) -> None:
        # Before taking the lock: in a forked child, the lock itself may be
        # held by a thread that only exists in the parent.
        if self._pid != os.getpid():
            self._forget_inherited()

    def on_after_fork(self) -> None:
        self._forget_inherited()

    def _reconnect(self) -> None:
        """After a lost connection: connect again, LISTEN again, then read
        what we missed. While the database cannot be reached (a failover, a
        restart), tried again for up to RECONNECT_PATIENCE seconds; Celery's
        ``reconnect_on_error`` gives up on the first failure of this."""
        deadline = time.monotonic() + RECONNECT_PATIENCE
        wait = RECONNECT_FIRST_WAIT
        stops = self._stops
        while True:
            try:
                self._reconnect_once()
                return
            except psycopg.OperationalError as exc:  # a connection error, as Celery's catch
                if time.monotonic() + wait > deadline or self._stops != stops:
                    raise
                logger.warning(
                    "pgbroker: waiting for results, the connection to PostgreSQL is lost "
                    "(%s): trying again in %.1f s",
                    " ".join(str(exc).split())[:300],
                    wait,
                )
                time.sleep(wait)
                wait = min(wait * 2, MAX_WAIT)

    def _reconnect_once(self) -> None:
        with self._lock:
            if self._connection is not None:
                with contextlib.suppress(psycopg.Error):
                    self._connection.close()
            self._drop_finalizer()
            self._connection = None
            conn = self._conn()
            self._sync_listens(conn)
            self._flush(conn)
            self._take_replies(conn, self._sent, "LISTEN")
            # Every channel's state is read below, after its LISTEN: the
            # reads the old connection lost are covered.
            task_ids = list(self._channels.values())
            for meta in self.backend.get_metas(task_ids):
                self.on_state_change(meta, None)

    # --- the pipeline (lock held) ----------------------------------------------------

    def _send(self, conn: psycopg.Connection, query: sql.Composable, tag: object) -> None:
        pipeline.send_query(conn, query.as_bytes(conn))
        self._inflight.append(tag)

    def _send_read(self, conn: psycopg.Connection, task_ids: list[str]) -> None:
        value = Transformer(conn).get_dumper(task_ids, PyFormat.TEXT).dump(task_ids)
        pipeline.send_prepared(conn, _READ_STATEMENT, [value])
        self._inflight.append(task_ids)

    def _sync(self, conn: psycopg.Connection) -> None:
        pipeline.sync(conn)
        self._inflight.append(_SYNC)
        self._sent += 1

    def _flush(self, conn: psycopg.Connection) -> None:
        pipeline.flush(conn, MAX_WAIT)

    def _sync_listens(self, conn: psycopg.Connection) -> list[str]:
        """Queue the LISTENs (and bulk UNLISTEN) due, as one transaction.

        Returns the ids of the tasks whose LISTEN it queued: they need a read
        once it is in effect (``_send_pending``).
        """
        # Swap first: cancel_for (maybe from a finaliser) adds to the new set.
        pending, self._pending_unlisten = self._pending_unlisten, set()
        for channel in pending:
            self._channels.pop(channel, None)
            self._to_listen.discard(channel)
            if channel in self._listening:
                self._stale.add(channel)
        live = len(self._listening) - len(self._stale)
        reset = len(self._stale) >= max(STALE_MAX, STALE_RATIO * live)
        if not self._to_listen and not reset:
            return []
        relisten: set[str] = set()
        if reset:
            # Applied in order at commit: the live channels are never left.
            self._send(conn, sql.SQL("UNLISTEN *"), _COMMAND)
            relisten = self._listening - self._stale
            self._listening, self._stale = set(), set()
        new = sorted(self._to_listen)
        for channel in sorted(relisten) + new:
            self._send(conn, sql.SQL("LISTEN {}").format(sql.Identifier(channel)), _COMMAND)
        self._sync(conn)
        self._listening.update(relisten, new)
        self._to_listen = set()
        return [self._channels[channel] for channel in new]

    def _take_replies(self, conn: psycopg.Connection, target: int, what: str) -> None:
        """Read ``conn`` until sync point ``target`` has its reply, lock held
        (no other thread reads meanwhile); what arrives stays in _incoming."""
        deadline = time.monotonic() + RECONNECT_TIMEOUT
        while self._synced < target:
            if time.monotonic() > deadline:
                raise psycopg.OperationalError(f"pgbroker: no reply to {what}")
            select.select([conn.fileno()], [], [], MAX_WAIT)
            self._collect(conn)

    def _send_pending(self, conn: psycopg.Connection) -> None:
        """Queue what is due: LISTENs, then one read of those tasks' rows."""
        task_ids = self._sync_listens(conn)
        if task_ids:
            self._send_read(conn, task_ids)
            self._sync(conn)
            for task_id in task_ids:
                self._initial[task_id] = self._sent

    def _collect(self, conn: psycopg.Connection) -> None:
        """Take the replies and notifications already received; never blocks."""
        pipeline.consume(conn)
        enc = conn.info.encoding
        error: psycopg.Error | None = None
        while self._inflight and not pipeline.busy(conn):
            tag = self._inflight[0]
            res = pipeline.take_result(conn)
            if tag is _SYNC:
                self._inflight.popleft()
                self._synced += 1
            elif res is None:  # the end of one query's replies
                self._inflight.popleft()
            elif (failed := pipeline.error(conn, res)) is not None:
                if isinstance(tag, list):
                    self._failed_reads.update(tag)  # their waiters read again
                else:
                    error = error or failed
            elif pipeline.has_rows(res) and isinstance(tag, list):
                found = set()
                for row in range(res.ntuples):
                    row_id = (res.get_value(row, 0) or b"").decode(enc)
                    found.add(row_id)
                    self._incoming.append((row_id, (res.get_value(row, 1) or b"").decode(enc)))
                self._incoming.extend((i, None) for i in tag if i not in found)
        for n in pipeline.notifies(conn):
            task_id = self._channels.get(n.relname.decode(enc))
            if task_id is not None:
                self._incoming.append((task_id, n.extra.decode(enc)))
        if not pipeline.alive(conn):
            raise psycopg.OperationalError("pgbroker: the LISTEN connection was lost")
        if error is not None:
            raise error

    def _deliver(self) -> None:
        """Hand what arrived to the waiting results (lock held)."""
        fetch: list[str] = []
        while self._incoming:
            task_id, payload = self._incoming.popleft()
            state, values = self._parse(payload)
            if state not in states.READY_STATES and self.on_message is None:
                continue  # only an on_message callback wants the states before
            if payload is None:
                self.on_state_change(
                    {"task_id": task_id, "status": states.PENDING, "result": None}, None
                )
            elif values is not None:
                self.on_state_change(self._meta(values), None)
            elif self.on_message is not None or self._is_waited(task_id):
                fetch.append(task_id)  # too large for the payload: read it
        if fetch:
            for meta in self.backend.get_metas(list(dict.fromkeys(fetch))):
                self.on_state_change(meta, None)

    @staticmethod
    def _parse(payload: str | None) -> tuple[str, list[Any] | None]:
        """The state in a read or notification, and the whole row if it is there."""
        if payload is None:
            return states.PENDING, None  # a read that found no row
        if not payload.startswith("["):
            return payload, None  # a bare state
        values = json.loads(payload)
        if len(values) == 2:
            return str(values[1]), None  # [task_id, state]: too large to carry
        return str(values[1]), values

    def _meta(self, values: list[Any]) -> dict[str, Any]:
        row = row_from_json(values)
        if row[7] is not None and self._connection is not None:
            # As psycopg loads timestamptz: in the session's time zone.
            row = (*row[:7], row[7].astimezone(self._connection.info.timezone), *row[8:])
        return self.backend._meta_from_row(row)

    def _is_waited(self, task_id: str) -> bool:
        return any(task_id in mapping for mapping in self._pending_results)

    # --- BaseResultConsumer API ---------------------------------------------------

    def start(self, initial_task_id: str, **kwargs: Any) -> None:
        self.consume_from(initial_task_id)

    def stop(self) -> None:
        self._check_fork()
        self._stops += 1
        with self._lock:
            if self._connection is not None and self._pid == os.getpid():
                self._connection.close()
            self._drop_finalizer()
            self._connection = None
            self._listening = set()
            self._inflight.clear()
            self._synced = self._sent

    def consume_from(self, task_id: str) -> None:
        # Only noted: the LISTEN and the read go out when a wait starts, one
        # transaction each for all the tasks noted by then (_send_pending).
        if "\0" in task_id:
            # libpq would cut the id at the NUL, and read another task's row.
            raise psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
        self._check_fork()
        channel = channel_for(self.backend.schema, task_id)
        with self._lock:
            self._pending_unlisten.discard(channel)
            self._channels[channel] = task_id
            if channel in self._listening:
                self._stale.discard(channel)
            else:
                self._to_listen.add(channel)

    def cancel_for(self, task_id: str) -> None:
        # Runs from AsyncResult.__del__ too, so it never blocks: the UNLISTEN
        # is sent by whoever takes the lock next.
        self._pending_unlisten.add(channel_for(self.backend.schema, task_id))
        self._initial.pop(task_id, None)
        self._failed_reads.discard(task_id)

    def forget(self, task_id: str) -> None:
        """Drop what this client holds of ``task_id``'s result, its row deleted.

        A result can arrive twice (the read after the LISTEN and the NOTIFY
        of a commit in between both bring it); the copy nobody waited for is
        kept in Celery's message buffer, or is still on the socket or at the
        server. Any of them would answer the next wait on that id, reused
        after ``forget()``, with the forgotten result. So the channel is left
        at once: after the reply to its UNLISTEN, the server sends nothing
        more of it, and what came before is dropped here.
        """
        self._check_fork()
        channel = channel_for(self.backend.schema, task_id)
        self.cancel_for(task_id)
        with self._lock:
            if channel in self._listening and self._connection is not None:
                with self.reconnect_on_error():
                    conn = self._conn()
                    self._send(
                        conn, sql.SQL("UNLISTEN {}").format(sql.Identifier(channel)), _COMMAND
                    )
                    self._sync(conn)
                    self._flush(conn)
                    self._listening.discard(channel)
                    self._stale.discard(channel)
                    self._take_replies(conn, self._sent, "UNLISTEN")
            self._incoming = deque(entry for entry in self._incoming if entry[0] != task_id)
            with contextlib.suppress(Empty):
                while True:
                    self._pending_messages.take(task_id)
            if self._incoming:  # the other tasks' news read on the way
                self._deliver()
                self._read_done.notify_all()

    def on_state_change(self, meta: dict[str, Any], message: Any) -> None:
        if not ONE_WAITER_PER_ID:
            super().on_state_change(meta, message)
        else:  # Celery 5.7's, for 5.5 and 5.6 (ManyWaiters)
            if self.on_message:
                self.on_message(meta)
            if meta["status"] in states.READY_STATES:
                results = _waiting_on(self._pending_results, meta["task_id"])
                if not results:
                    self._pending_messages.put(meta["task_id"], meta)
                for result in results:
                    result._maybe_set_cache(meta)
                    bucket = self.buckets.pop(result, None)
                    if bucket is not None:
                        bucket.append(result)
        if meta["status"] in states.READY_STATES:
            self.cancel_for(meta["task_id"])

    def on_wait_for_pending(self, result: Any, **kwargs: Any) -> None:
        ids = [r.id for r in result.results] if isinstance(result, ResultSet) else [result.id]
        self._check_fork()
        with self._lock:
            with self.reconnect_on_error():
                conn = self._conn()
                self._send_pending(conn)
                self._flush(conn)
            read = [self._initial.pop(task_id, None) for task_id in ids]
            target = self._sent
        # Every LISTEN sent so far is in effect once its sync point is back,
        # and the read sent after it has been delivered.
        self._wait_synced(target)
        with self._lock:
            failed = self._failed_reads.intersection(ids)
            self._failed_reads.difference_update(ids)
        if None in read or failed:
            # No read followed this task's LISTEN (already listening, or a
            # second wait): read the state now, after the LISTEN.
            for meta in result._iter_meta(**kwargs):
                if meta is not None:
                    self.on_state_change(meta, None)
        if isinstance(result, ResultSet):
            _fire_if_complete(result)

    def _wait_synced(self, target: int) -> None:
        while True:
            with self._lock:
                # (After a reconnect or a stop, nothing sent before is awaited.)
                if self._synced >= min(target, self._sent) or self._connection is None:
                    self._deliver()
                    return
            self._step(MAX_WAIT)

    def drain_events_until(
        self, p: Any, timeout: float | None = None, on_interval: Any = None
    ) -> Iterator[None]:
        # Celery 5.5 and 5.6 drain once (up to 1 s) before looking at p, so
        # a get() of a result that on_wait_for_pending already delivered
        # took a second; 5.7 looks first. Looked at first here on every version.
        if p.ready:
            return iter(())
        return super().drain_events_until(  # type: ignore[no-any-return]
            p, timeout=timeout, on_interval=on_interval
        )

    def drain_events(self, timeout: float | None = None) -> None:
        self._step(MAX_WAIT if timeout is None else min(timeout, MAX_WAIT))

    def _step(self, wait: float) -> None:
        """Wait up to ``wait`` seconds for something to arrive, and deliver it."""
        self._check_fork()
        with self._lock:
            if self._reader:
                # Another thread waits on the socket; what it reads may be
                # ours, so wait for it to read and deliver instead.
                self._read_done.wait(wait)
                return
            with self.reconnect_on_error():
                conn = self._conn()
                if self._pending_unlisten or self._to_listen:
                    self._send_pending(conn)
                    self._flush(conn)
                self._collect(conn)
            conn = self._connection  # type: ignore[assignment]
            if self._incoming or conn is None:
                self._deliver()
                return
            if not self._channels and not self._inflight:
                self._read_done.wait(wait)
                return
            self._reader = True
        try:
            # A socket closed by a reconnect: the read below finds out.
            with contextlib.suppress(OSError, ValueError):
                select.select([conn.fileno()], [], [], max(wait, 0))
        finally:
            with self._lock:
                try:
                    with self.reconnect_on_error():
                        if self._connection is conn:
                            self._collect(conn)
                    self._deliver()
                finally:
                    self._reader = False
                    self._read_done.notify_all()
