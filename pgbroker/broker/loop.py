"""Celery's event loop (kombu's Hub) and the consumer's session.

With Celery's event loop the session's socket is in the loop: a NOTIFY or a
claim's reply makes it readable (``_on_readable``); acks made in the loop
are written once per tick (``_on_tick``); timers sweep (``_on_sweep_timer``)
and promote delayed messages when due (``_on_due_timer``). A statement's
own error in a callback leaves the session and its messages (``_in_loop``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import psycopg

from pgbroker.broker.consumer import CLAIM_BATCH_WAIT
from pgbroker.broker.cursor import ClaimCursors
from pgbroker.errors import STATEMENT_ERRORS, statement_error
from pgbroker.logs import recovery
from pgbroker.options import TransportOptions

logger = logging.getLogger("pgbroker.broker")

#: Seconds before the event loop claims again after a statement's error.
STATEMENT_RETRY = 1.0

#: Longest sleep of an idle event loop (seconds). Celery's worker checks
#: for a shutdown between two turns of its loop; a shutdown asked for from
#: another thread (``celery.contrib.pytest``'s ``celery_worker`` sets
#: ``state.should_terminate``) wakes nothing, and an idle consumer has no
#: I/O until its next sweep. A timer that runs no query bounds the wait
#: (Redis's loop wakes up every second for its BRPOP timeout).
LOOP_WAKE_INTERVAL = 0.5


class EventLoop:
    """Callbacks and timers of the event loop (a mixin of
    :class:`pgbroker.broker.transport.Transport`, whose state it uses)."""

    _loop: Any
    _loop_thread: int | None
    _fd: int  # the socket registered with the event loop
    _sweep_tref: Any
    _wake_tref: Any  # LOOP_WAKE_INTERVAL
    _due_tref: Any
    _due_armed: float | None
    _retry_tref: Any  # after a statement's error in the loop
    _claim_tref: Any  # when a claim put off for a fuller batch is due
    _fallback_tref: Any  # when a fallback claim is due (pgbroker.broker.cursor)
    _cursors: ClaimCursors
    _claim_waiting_since: float | None
    _acks: list[int]
    _ready: set[str]
    consumer_id: int | None
    options: TransportOptions

    if TYPE_CHECKING:

        @property
        def conn(self) -> psycopg.Connection: ...

        def read_notifies(self) -> None: ...

        def claim_and_deliver(self) -> int: ...

        def flush_acks(self) -> None: ...

        def sweep(self) -> tuple[int, int, int]: ...

        def maybe_promote(self) -> None: ...

        def _arm_due_timer(self) -> bool: ...

        def _swept_elsewhere(self) -> bool: ...

        def _take_woken(self) -> None: ...

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        self._unregister_loop()
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._fd = self.conn.fileno()
        loop.add_reader(self._fd, self._on_readable)
        loop.on_tick.add(self._on_tick)
        self._sweep_tref = loop.call_repeatedly(self.options.sweep_interval, self._on_sweep_timer)
        self._wake_tref = loop.call_repeatedly(LOOP_WAKE_INTERVAL, _nothing)
        # Sweep once at start too, as drain_events does: a worker restarted
        # after a crash takes back the dead workers' messages at once, not
        # one sweep_interval later.
        loop.call_soon(self._on_sweep_timer)

    def _unregister_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        loop.on_tick.discard(self._on_tick)
        if self._fd >= 0:
            loop.remove_reader(self._fd)
            self._fd = -1
        if self._sweep_tref is not None:
            self._sweep_tref.cancel()
            self._sweep_tref = None
        if self._wake_tref is not None:
            self._wake_tref.cancel()
            self._wake_tref = None
        if self._due_tref is not None:
            self._due_tref.cancel()
            self._due_tref = None
        self._due_armed = None
        if self._retry_tref is not None:
            self._retry_tref.cancel()
            self._retry_tref = None
        if self._claim_tref is not None:
            self._claim_tref.cancel()
            self._claim_tref = None
        if self._fallback_tref is not None:
            self._fallback_tref.cancel()
            self._fallback_tref = None
        self._claim_waiting_since = None

    def _on_due_timer(self) -> None:
        self._due_tref = None
        self._due_armed = None
        with self._in_loop():
            self.maybe_promote()
            self.claim_and_deliver()
        self._arm_due_timer()

    def _on_readable(self) -> None:
        with self._in_loop():
            self.read_notifies()
            self.claim_and_deliver()
        self._arm_due_timer()

    def _on_retry(self) -> None:
        self._retry_tref = None
        self._on_readable()

    @contextlib.contextmanager
    def _in_loop(self) -> Iterator[None]:
        """An event-loop callback's statements. A statement's own error (a
        statement or lock timeout, a cancel, a serialization failure) leaves
        the session working: raised into Celery's loop it would stop the
        worker's consumer (channel errors) or, were it a connection error,
        hand back every message it holds. Say so and try again shortly."""
        try:
            yield
        except STATEMENT_ERRORS as exc:
            if not statement_error(exc):
                raise  # a lost session, or not one of this session's statements
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            logger.warning(
                "pgbroker: a statement on the consumer's session failed (%s: %s); "
                "the session and the messages it holds are kept, trying again in %g s",
                type(exc).__name__,
                detail,
                STATEMENT_RETRY,
                extra=recovery(
                    "statement_retry", consumer=self.consumer_id, reason=type(exc).__name__
                ),
            )
            if self._loop is not None and self._retry_tref is None:
                self._retry_tref = self._loop.call_later(STATEMENT_RETRY, self._on_retry)

    def _on_tick(self) -> None:
        # Acks made in the loop wait for the next tick: a claim in it takes
        # them along (one commit); otherwise they are written then.
        earlier_acks = bool(self._acks)
        wake = False
        with self._in_loop():
            self._take_woken()  # notified during a statement (psycopg's handler)
            wake = bool(self._ready and self.claim_and_deliver())
            if self._ready and self._claim_waiting_since is not None:
                # A claim put off for a fuller batch: the acks ride on it,
                # at the latest when its wait is over.
                self._arm_claim_timer()
            elif earlier_acks and self._acks:  # no claim took them along
                self.flush_acks()
        # Celery's prefork pool sends queued tasks to its children from
        # its own on_tick callback, which may already have run in this
        # tick: wake the loop so that its next tick does, instead of the
        # tasks waiting for the next timer or I/O event (up to seconds).
        # Likewise when a due time came with a reply read in this tick: the
        # loop chose how long to wait before the timer existed.
        self._arm_fallback_timer()
        if self._arm_due_timer() or wake:
            waker = getattr(self._loop, "_waker", None)  # kombu 5.7 Hub
            if waker is not None:
                waker.wake()

    def _arm_claim_timer(self) -> None:
        if self._claim_tref is None and self._claim_waiting_since is not None:
            wait = self._claim_waiting_since + CLAIM_BATCH_WAIT - time.monotonic()
            self._claim_tref = self._loop.call_later(max(wait, 0.0), self._on_claim_timer)

    def _on_claim_timer(self) -> None:
        self._claim_tref = None
        self._on_tick()

    def _arm_fallback_timer(self) -> None:
        """A timer for the next fallback claim, if one is due and none is
        set. Fallback times only come later (each is a fixed time after its
        notification), so the timer set is never too late."""
        if self._loop is None or self._fallback_tref is not None:
            return
        if (at := self._cursors.next_fallback()) is not None:
            wait = max(at - time.monotonic(), 0.0)
            self._fallback_tref = self._loop.call_later(wait, self._on_fallback_timer)

    def _on_fallback_timer(self) -> None:
        self._fallback_tref = None
        self._on_tick()  # takes the due fallbacks, claims, sets the next timer

    def _on_sweep_timer(self) -> None:
        if self.consumer_id is not None and not self._swept_elsewhere():
            with self._in_loop():
                self.sweep()
                self.maybe_promote()  # a sweep that found more due rows
        self._arm_due_timer()


def _nothing() -> None:
    """A timer's callback whose only effect is a turn of the event loop."""
