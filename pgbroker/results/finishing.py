"""The result backend's side of finishing a task in one transaction.

:mod:`pgbroker.broker.finish` holds the next link of a chain that a task
run sends as it ends; this mixin of
:class:`pgbroker.results.backend.PostgresBackend` commits it with the run's
success (``mark_as_done``) and the ack of the run's own message
(``finish_ack``), in one transaction on the backend's connection. A
successful ``acks_late`` run that hands nothing on commits its result and
its ack together too, and a task that opts into its outbox commits what
its body sent with its success, and drops it when it fails or retries.
Failures, runs of messages from another database or schema, and a backend
elsewhere: the usual path, unchanged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import celery
import psycopg
from celery import signals, states
from psycopg.rows import tuple_row

from pgbroker.broker import enqueue, finish
from pgbroker.broker import header as chord_header
from pgbroker.broker.messages import log_publish_outcome
from pgbroker.database import pipeline, queries
from pgbroker.logs import recovery

logger = logging.getLogger("pgbroker.results")

if celery.VERSION[:2] < (5, 6):
    # Celery 5.5 pops a chain's next link before publishing it: noted at the
    # start of each run for finish.hold (pgbroker/broker/finish.py).
    signals.task_prerun.connect(
        finish.note_next_link, weak=False, dispatch_uid="pgbroker.finish.note_next_link"
    )

T = TypeVar("T")


class _Dropped(Exception):
    """The finish must write nothing (``finish_ack``'s outcome, a key of
    DROPPED): roll back."""


#: The outcomes of ``finish_ack`` that roll a finish back: what the log
#: says after "task ... finished, but", and the reason it records.
DROPPED = {
    "elsewhere": (
        "its message is no longer held by this delivery (the worker's session was "
        "lost and another consumer has had the message since): its outcome and next "
        "link are left to the delivery that has it now",
        "not held",
    ),
    "other timeline": (
        "its message was claimed on another server timeline (the database failed over "
        "since, and the old primary's last commits, which may hold this run's work, "
        "are lost): nothing written; the message is delivered again",
        "other timeline",
    ),
}


class _FinishedAlready(Exception):
    """An ``acks_late`` run's message is gone: a finish removed it (this
    one, whose commit's reply was lost before the pool ran it again, or
    another delivery's). Nothing more to write."""


class FinishingBackend:
    """Mark a task done or failed together with what it hands on."""

    schema: str
    _finishing: threading.local

    if TYPE_CHECKING:  # PostgresBackend's

        def _run(self, fn: Callable[[psycopg.Connection], T]) -> T: ...

        def _write_result(self, params: dict[str, Any], defer: bool) -> None: ...

        queries: Any

    def _offer_finishes(self) -> None:
        self._finishing = threading.local()
        self._broker_sql: Any = None
        finish.offer(self)

    def process_cleanup(self) -> None:
        """After each task run (Celery's worker calls it): anything still
        held for a run that stored no outcome goes out now; a chord header
        the run stopped sending is dropped."""
        finish.release()
        chord_header.discard()

    def _broker_queries(self) -> Any:
        """The broker's statements in this backend's schema (a finish runs
        only where the broker's schema is this one)."""
        if self._broker_sql is None:
            self._broker_sql = queries.for_schema(self.schema, "queries.sql")
        return self._broker_sql

    def database_fingerprint(self) -> str | None:
        try:
            return self._run(lambda conn: enqueue.fingerprint(conn, self.schema)[0])
        except psycopg.Error:
            return None  # unknown: never finish in one transaction

    def mark_as_done(
        self,
        task_id: str,
        result: Any,
        request: Any = None,
        store_result: bool = True,
        state: str = states.SUCCESS,
    ) -> None:
        held = finish.take(task_id) or finish.own_message(task_id)
        with _Finish(self, held):
            super().mark_as_done(task_id, result, request, store_result, state)  # type: ignore[misc]

    def mark_as_failure(
        self,
        task_id: str,
        exc: Any,
        traceback: Any = None,
        request: Any = None,
        store_result: bool = True,
        call_errbacks: bool = True,
        state: str = states.FAILURE,
    ) -> None:
        # A failure's message is Celery's to acknowledge, reject or requeue
        # (acks_on_failure_or_timeout, reject_on_worker_lost): a next link
        # held as the run succeeded, whose success could not be stored
        # (EncodeError), goes out as it did before the finish existed; what
        # the body sent through its outbox does not go out at all (the
        # errbacks Celery sends from here on go out when sent).
        finish.unfinished(task_id, "failed")
        super().mark_as_failure(  # type: ignore[misc]
            task_id, exc, traceback, request, store_result, call_errbacks, state
        )

    def mark_as_retry(self, task_id: str, *args: Any, **kwargs: Any) -> None:
        # The retry sent by Task.retry (the run's own task id) was not held;
        # what the body sent through its outbox is not sent: the next run
        # sends it again.
        finish.unfinished(task_id, "retries")
        super().mark_as_retry(task_id, *args, **kwargs)  # type: ignore[misc]

    def _write_finished(self, params: dict[str, Any]) -> bool:
        """Store ``params`` (a ready state) with what the current finish
        holds, if anything: True if done (or given up because another
        delivery holds the message), False for the usual path."""
        held: finish.Held | None = getattr(self._finishing, "held", None)
        if held is None or params["task_id"] != held.task_id:
            return False
        self._finishing.held = None
        self._commit(held, params)
        return True

    def _commit(self, held: finish.Held, params: dict[str, Any] | None) -> None:
        """One transaction: ack the run's message (if this delivery holds
        it), send the held messages, store the result (``params``, if any).

        Pipelined (two round trips, whatever it holds): BEGIN, the ack, the
        publishes and the result go in one batch, the ack's outcome is read
        with their replies, then COMMIT, or ROLLBACK when the outcome says
        this delivery must write nothing.

        The held messages skip publish deduplication only for the first
        delivery of an ``acks_late`` message whose ack here finds it held
        ('acked'): it cannot be delivered again after the commit, and
        before it no run sent anything. Any other outcome of such a finish
        rolls it back: with ``acks_late`` a message gone means finished
        (only a finish removes a message its delivery holds, and purges
        leave held messages alone), and 'elsewhere' leaves it to the
        delivery that has it now. A redelivery keeps deduplication (an
        earlier run may have sent its link the usual way, as after a failed
        finish, and lost its ack), and so does a run without ``acks_late``
        (its message acknowledged as it was delivered: a delivery whose
        early ack was lost may be finishing too).
        """
        ack = {
            "message_id": held.message_id,
            "consumer_id": held.consumer_id,
            "delivery_count": held.delivery_count,
            "published_at": held.published_at,
            "timeline": held.timeline,
        }
        skip_dedup = held.acks_late and held.delivery_count == 1
        published: list[tuple[Any, dict[str, Any]]] = []

        def write(conn: psycopg.Connection) -> None:
            published.clear()
            sent: list[tuple[psycopg.Cursor[Any], dict[str, Any]]] = []
            with pipeline.transaction(conn):
                acked = conn.cursor(row_factory=tuple_row)
                acked.execute(self._broker_queries()["finish_ack"], ack)
                for t, message in held.all_messages():
                    if skip_dedup:
                        message = {**message, "dedup": False}
                    cur = conn.cursor(row_factory=tuple_row)
                    cur.execute(t.queries["publish_routing"], message)
                    sent.append((cur, message))
                if params is not None:
                    conn.execute(self.queries["store_result"], params)
                row = acked.fetchone()  # the first round trip: all of the above
                outcome = "gone" if row is None else row[0]
                if outcome in DROPPED:
                    raise _Dropped(outcome)
                if outcome == "gone" and held.acks_late:
                    raise _FinishedAlready
                published.extend((cur.fetchone(), message) for cur, message in sent)
            # the second round trip: COMMIT

        try:
            self._run(write)
        except _Dropped as dropped:
            why, reason = DROPPED[dropped.args[0]]
            logger.warning(
                "task %s finished, but %s",
                held.task_id,
                why,
                extra=recovery("finish_dropped", task_id=held.task_id, reason=reason),
            )
            return
        except _FinishedAlready:
            logger.info(
                "task %s: its message was acknowledged by a finish already (a commit whose "
                "reply was lost, or another delivery's): nothing more to write",
                held.task_id,
                extra=recovery("finish_done_already", task_id=held.task_id, reason="gone"),
            )
            return
        except psycopg.Error as exc:
            self._after_failed_commit(held, params, exc)
            return
        for row, message in published:
            if row:
                log_publish_outcome(row, message)

    def _after_failed_commit(
        self, held: finish.Held, params: dict[str, Any] | None, exc: psycopg.Error
    ) -> None:
        """The finish failed, or its commit's reply was lost. With acks_late
        the message tells which: gone, the finish committed (only it removes
        a message this delivery holds); there, it did not. Then, or without
        acks_late, the usual path: a result stored again is the same, and
        publish deduplication stores a link sent twice once."""
        if held.acks_late:
            check = {"message_id": held.message_id}
            query = self._broker_queries()["message_exists"]
            row = self._run(lambda conn: conn.execute(query, check).fetchone())
            if row is not None and not row[0]:
                return  # committed
        logger.warning(
            "task %s: finishing in one transaction failed (%s): storing its outcome "
            "and sending its next link separately",
            held.task_id,
            exc,
            extra=recovery("finish_separately", task_id=held.task_id, reason=type(exc).__name__),
        )
        finish.send_separately(held)
        if params is not None:
            self._write_result(params, defer=False)


class _Finish:
    """While the backend marks a task done or failed: what it must commit
    with the outcome. If no ready state was stored (``ignore_result``), the
    ack and the held messages commit on their own when it ends."""

    def __init__(self, backend: FinishingBackend, held: finish.Held | None) -> None:
        self.backend = backend
        self.held = held

    def __enter__(self) -> None:
        self.backend._finishing.held = self.held

    def __exit__(self, *exc: object) -> None:
        held: finish.Held | None = getattr(self.backend._finishing, "held", None)
        self.backend._finishing.held = None
        if held is None:
            return
        if exc[0] is not None:
            # The success could not be stored (Celery marks the run failed
            # next): as without a finish, and no outbox.
            finish.unfinished(held, "failed")
            return
        self.backend._commit(held, None)
