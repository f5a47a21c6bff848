"""Push-based ``get()``: wake waiters with LISTEN/NOTIFY instead of polling.

Each task has its own notification channel (``channel_for``). The client
LISTENs on it before the task is sent (``on_task_call``), the worker's
``store_result`` statement NOTIFYs it with the new state, and the consumer
then reads the row once. While nothing happens, a waiting ``get()`` only
waits on the socket of its LISTEN connection: it sends no query.

Modelled on Celery's Redis ``ResultConsumer``: one thread at a time reads
the connection; the others wait on a condition the reader signals.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import select
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

import psycopg
from celery import states
from celery.backends.asynchronous import BaseResultConsumer
from psycopg import sql

from pgbroker.forking import neutralise

if TYPE_CHECKING:
    from pgbroker.backend import PostgresBackend

logger = logging.getLogger("pgbroker")

#: Longest time spent in one wait on the socket, so that a reconnect by
#: another thread or a stop request is noticed.
MAX_WAIT = 1.0


def channel_for(schema: str, task_id: str) -> str:
    """The NOTIFY channel of one task: short, fixed length, schema-specific."""
    digest = hashlib.md5(f"{schema}/{task_id}".encode(), usedforsecurity=False).hexdigest()
    return "pgr_" + digest


class ResultConsumer(BaseResultConsumer):  # type: ignore[misc]
    backend: PostgresBackend

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connection_errors = (psycopg.OperationalError,)
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.RLock()
        self._read_done = threading.Condition(self._lock)
        self._reader = False
        self._conn: psycopg.Connection | None = None
        self._pid = os.getpid()
        #: channel -> task id, for every channel we LISTEN on (or will).
        self._channels: dict[str, str] = {}
        #: channels LISTENed on the current connection.
        self._listening: set[str] = set()
        #: channels to UNLISTEN when the lock is next taken; never blocks.
        self._pending_unlisten: set[str] = set()
        self._notified: deque[psycopg.Notify] = deque()

    # --- connection ---------------------------------------------------------------

    def _connection(self) -> psycopg.Connection:
        """The LISTEN connection of this process (caller holds the lock)."""
        if self._pid != os.getpid():
            self._forget_inherited()
        if self._conn is None or self._conn.closed:
            conn = self.backend.connect()
            conn.add_notify_handler(self._notified.append)
            self._conn = conn
            self._listening = set()
        return self._conn

    def _forget_inherited(self) -> None:
        # The parent's connection must not be used or closed here: closing
        # it would end the parent's session.
        if self._conn is not None:
            neutralise(self._conn)
        self._reset()

    def on_after_fork(self) -> None:
        self._forget_inherited()

    def _sync_listens(self) -> None:
        """Bring LISTEN/UNLISTEN on the connection in line (lock held)."""
        conn = self._connection()
        gone = self._pending_unlisten & self._listening
        for channel in self._pending_unlisten:
            self._channels.pop(channel, None)
        self._pending_unlisten.clear()
        wanted = set(self._channels) - self._listening
        parts = [sql.SQL("UNLISTEN {}").format(sql.Identifier(c)) for c in sorted(gone)]
        parts += [sql.SQL("LISTEN {}").format(sql.Identifier(c)) for c in sorted(wanted)]
        if parts:
            conn.execute(sql.SQL("; ").join(parts))
            self._listening = (self._listening - gone) | wanted

    def _reconnect(self) -> None:
        """After a lost connection: LISTEN again, then read what we missed."""
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(psycopg.Error):
                    self._conn.close()
            self._conn = None
            self._listening = set()
            self._sync_listens()
            task_ids = list(self._channels.values())
        for meta in self.backend.get_metas(task_ids):
            self.on_state_change(meta, None)

    # --- BaseResultConsumer API ---------------------------------------------------

    def start(self, initial_task_id: str, **kwargs: Any) -> None:
        self.consume_from(initial_task_id)

    def stop(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None
            self._listening = set()

    def consume_from(self, task_id: str) -> None:
        channel = channel_for(self.backend.schema, task_id)
        with self._lock:
            self._pending_unlisten.discard(channel)
            self._channels[channel] = task_id
            if channel not in self._listening or self._pid != os.getpid():
                with self.reconnect_on_error():
                    self._sync_listens()

    def cancel_for(self, task_id: str) -> None:
        # Runs from AsyncResult.__del__ too, so it never blocks: the UNLISTEN
        # is sent by whoever takes the lock next.
        channel = channel_for(self.backend.schema, task_id)
        self._pending_unlisten.add(channel)

    def on_state_change(self, meta: dict[str, Any], message: Any) -> None:
        super().on_state_change(meta, message)
        if meta["status"] in states.READY_STATES:
            self.cancel_for(meta["task_id"])

    def on_wait_for_pending(self, result: Any, **kwargs: Any) -> None:
        # The one query of a get(): the state as it is now. Anything later
        # arrives by NOTIFY, because we LISTEN before this read.
        for meta in result._iter_meta(**kwargs):
            if meta is not None:
                self.on_state_change(meta, None)

    def drain_events(self, timeout: float | None = None) -> None:
        wait = MAX_WAIT if timeout is None else min(timeout, MAX_WAIT)
        with self._lock:
            if self._reader:
                # Another thread waits on the socket; what it reads may be
                # ours, so wait for it to finish instead.
                self._read_done.wait(wait)
                return
            with self.reconnect_on_error():
                conn = self._connection()
                if self._pending_unlisten:
                    self._sync_listens()
                self._read(conn)
            conn = self._conn  # type: ignore[assignment]
            if conn is None or (not self._notified and not self._channels):
                self._read_done.wait(wait)
                return
            self._reader = True
        try:
            if not self._notified:
                # A socket closed by a reconnect: the read below finds out.
                with contextlib.suppress(OSError, ValueError):
                    select.select([conn.fileno()], [], [], max(wait, 0))
                with self._lock, self.reconnect_on_error():
                    if self._conn is conn:
                        self._read(conn)
        finally:
            with self._lock:
                self._reader = False
                self._read_done.notify_all()
        self._deliver()

    # --- notifications ------------------------------------------------------------

    def _read(self, conn: psycopg.Connection) -> None:
        """Read notifications already on the socket, without a query."""
        pgconn = conn.pgconn
        pgconn.consume_input()
        enc = conn.info.encoding
        while (n := pgconn.notifies()) is not None:
            self._notified.append(
                psycopg.Notify(n.relname.decode(enc), n.extra.decode(enc), n.be_pid)
            )
        if pgconn.status != psycopg.pq.ConnStatus.OK:
            raise psycopg.OperationalError("pgbroker: the LISTEN connection was lost")

    def _deliver(self) -> None:
        wanted: list[str] = []
        with self._lock:
            while self._notified:
                n = self._notified.popleft()
                task_id = self._channels.get(n.channel)
                if task_id is None:
                    continue
                # Intermediate states matter only to an on_message callback.
                if n.payload in states.READY_STATES or self.on_message is not None:
                    wanted.append(task_id)
        if wanted:
            for meta in self.backend.get_metas(list(dict.fromkeys(wanted))):
                self.on_state_change(meta, None)
