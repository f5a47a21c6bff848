"""The consumer session: claims, acks, requeues and sweeps.

A consuming transport registers a consumer (its session holds an advisory
lock for as long as it lives), attaches its queues and claims up to the
free prefetch count in one statement. Acks are batched and fenced: only the
consumer that holds a message can ack, requeue or dead-letter it. Acks made
for a session that was lost are written by the process's next session on
the same broker (``_orphan``, docs/delivery.md). The sweep hands the
messages of consumers whose lock is gone back to their queues.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import psycopg
from psycopg import sql

from pgbroker.broker import sweeper
from pgbroker.broker.cursor import (
    WHOLE_QUEUE,
    ClaimCursors,
    Position,
    claim_params,
    place_payload,
)
from pgbroker.broker.messages import to_raw
from pgbroker.broker.sweeper import (
    HOUSEKEEP_AGAIN,
    PROMOTE_BATCH,
    drop_dead_consumers_queues,
    log_sweep,
    sweep_more,
)
from pgbroker.database.forking import process_key
from pgbroker.errors import STATEMENT_ERRORS
from pgbroker.logs import recovery
from pgbroker.options import TransportOptions

if TYPE_CHECKING:
    from pgbroker.broker.channel import Channel

logger = logging.getLogger("pgbroker.broker")

#: Largest claim when the consumer sets no prefetch limit.
UNLIMITED_CLAIM = 100

#: In Celery's event loop, a consumer that still holds messages claims again
#: once half of its prefetch window is free, or once it has waited this long
#: (seconds) for that: one claim (one commit, carrying the acks made
#: meanwhile) per few tasks instead of one per task, while the worker still
#: has messages to run. An ack waits at most this long for the claim it
#: rides on.
CLAIM_BATCH_WAIT = 0.05

#: A consumer whose deliveries (the callbacks of a claim's messages), or the
#: gaps between its ``drain_events`` calls, took longer than this (seconds)
#: runs the work itself (Celery's solo pool, a Kombu callback that does the
#: job): it cannot act on a wake-up meanwhile, so it does not wait for one
#: (see ``_wake_min``); publishes that name nobody wake it.
BLOCKING_DELIVERY = 0.1
#: How long (seconds) a consumer counts as running the work itself after its
#: last slow delivery or long gap. Not for good: one paused once (a GC, a
#: loaded machine that leaves its thread unscheduled that long, an
#: application that stops draining for a while) is then woken alone again,
#: not by every publish that names nobody for the rest of its session.
BLOCKING_MEMORY = 10.0

#: A consumer changes whether it waits for a wake-up in a queue
#: (consumer_queue.waiting_since, written by its claims) at most once per
#: this many seconds: one that turns busy and idle at every message (a
#: prefetch of 1, a load at the half-window line) would write the row at
#: every claim, and while a long transaction pins the xmin horizon every
#: such write leaves a row version that each publish's lookup of a waiting
#: consumer steps over (docs/benchmarks.md, "Wake-ups"). A stale value
#: costs a passed-on wake-up or a fallback claim, never a message.
WAITING_WRITE_EVERY = 1.0


class Held(NamedTuple):
    """A message a claim handed out, until its ack is written or it is
    handed back. ``registration`` says which of its transport's consumers
    claimed it (a transport registers a new one in each session): consumer
    ids can come again (see ``ack_orphaned`` in queries.sql), registrations
    cannot. ``published_at`` with the id names the message for good;
    ``timeline``, the server's when it was claimed, says whether an ack
    from a lost session may still be written (``_flush_orphans``)."""

    consumer_id: int
    registration: int
    delivery_count: int
    published_at: datetime
    timeline: int | None


#: Every consumer registration of this process gets the next number.
_registrations = itertools.count(1)


class ConsumerSession:
    """The consumer of a transport's session (a mixin of
    :class:`pgbroker.broker.transport.Transport`, whose state it uses)."""

    channels: list[Channel]
    options: TransportOptions
    url: str
    channel_name: str
    due_channel: str
    consumer_id: int | None
    origin: str | None
    _lock_class: int
    _lock_oid: int
    _listening: bool
    _attached: set[str]
    _ready: set[str]
    _cursors: ClaimCursors  # where each queue's next claim starts
    _acks: list[int]
    _riding: list[int]
    _held: dict[int, Held]
    _registration: int
    _timeline: int | None  # the server's, when the consumer registered
    _orphan_key: tuple[str, str]
    _loop: Any
    _loop_thread: int | None
    _next_sweep: float
    _turn: int
    _defer_acks: bool
    _commit_pending: bool
    _io: threading.RLock
    _sweeper: sweeper.Sweeper | None
    _due_at: float | None
    _claim_waiting_since: float | None  # a claim put off for a fuller batch
    _blocked_at: float | None  # the last slow delivery or long gap (BLOCKING_DELIVERY)
    # Per queue, whether the consumer waits there as its claims last wrote
    # it, for which registration, and when (see WAITING_WRITE_EVERY).
    _waits_written: dict[str, tuple[int, bool, float]]

    if TYPE_CHECKING:

        @property
        def conn(self) -> psycopg.Connection: ...

        def run(self, query: str, /, **params: Any) -> Any: ...

        def _fingerprint(self) -> str: ...

        def run_all(self, query: str, /, **params: Any) -> list[Any]: ...

        def run_count(self, query: str, /, **params: Any) -> int: ...

        def _statements(self) -> contextlib.AbstractContextManager[None]: ...

        def _settle(self, block: bool = True) -> bool: ...

        def _session_gone(self) -> bool: ...

        def _deliver(self, message: Any, queue: str) -> None: ...

        def _learn_due(self, due: float | None, server_now: float | None = None) -> None: ...

        def maybe_promote(self) -> None: ...

    # --- claims ---------------------------------------------------------------------

    def _ensure_consumer(self) -> int:
        if self.consumer_id is None:
            row = self.run(
                "register_consumer",
                hostname=socket.gethostname(),
                pid=os.getpid(),
                process_key=process_key(),
                lock_class=self._lock_class,
            )
            self.consumer_id = int(row[0])
            self._registration = next(_registrations)
            self._timeline = row[2]
            # Where its messages come from (once per session): a result
            # backend there may acknowledge them (pgbroker/broker/finish.py).
            self.origin = self._fingerprint()
            if self.options.fast_recovery and self._sweeper is None:
                self._sweeper = sweeper.acquire(self.url, self.options)
            # Before this consumer claims anything: the acks of a lost session.
            self._flush_orphans()
        return self.consumer_id

    def attach(self, queue: str) -> None:
        consumer_id = self._ensure_consumer()
        if not self._listening:
            with self._io, self._statements():
                self.conn.execute(
                    sql.SQL("LISTEN {}; LISTEN {}").format(
                        sql.Identifier(self.channel_name), sql.Identifier(self.due_channel)
                    )
                )
            self._listening = True
        if queue not in self._attached:
            row = self.run("attach_queue", consumer_id=consumer_id, queue=queue)
            self._attached.add(queue)
            self._learn_due(row[0], row[1])
        self._ready.add(queue)
        self._cursors.rescan(queue)

    def detach(self, queue: str) -> None:
        if queue in self._attached and self.consumer_id is not None:
            self._attached.discard(queue)
            self._ready.discard(queue)
            row = self.run("detach_queue", consumer_id=self.consumer_id, queue=queue)
            if row and row[0]:
                # Auto-delete: it goes if that was its last consumer.
                self.run("drop_unused_queues", queue=queue)

    def claim(
        self,
        queue: str,
        limit: int,
        no_ack: bool,
        settle: bool = True,
        start: Position = WHOLE_QUEUE,
        wake_min: int | None = None,
    ) -> list[Any]:
        """Claim up to ``limit`` messages from ``start`` in service order
        (pgbroker.broker.cursor); with ``settle`` off, return before the
        claim's commit has been confirmed (see ``_run_pipelined``). With
        ``wake_min``, the consumer waits for a wake-up after this claim if
        it leaves at least that many places free and nothing more is ready,
        and not otherwise (``claim`` in queries.sql); without, whether it
        waits stays as it is (``basic_get``, see WAITING_WRITE_EVERY)."""
        if no_ack:
            return self.run_all("claim_no_ack", queue=queue, limit=limit)
        consumer_id = self._ensure_consumer()
        if _orphaned.get(self._orphan_key):
            self._flush_orphans()
        # The acks not written yet commit with the claim (see `claim` in
        # queries.sql); until its commit is confirmed they are "riding".
        self._settle()
        self._riding, self._acks = self._acks, []
        try:
            rows = self.run_all(
                "claim",
                queue=queue,
                limit=limit,
                consumer_id=consumer_id,
                acks=self._riding,
                wake_min=wake_min,
                **claim_params(start),
            )
        except BaseException:
            self._unride()
            raise
        for row in rows:
            self._held[row[0]] = Held(
                consumer_id, self._registration, row[2], row[11], self._timeline
            )
        if settle:
            self._settle()
        return rows

    def claim_and_deliver(self) -> int:
        """Claim from queues that may have work, up to each channel's free
        prefetch, and hand the messages to their consumers. Pending acks go
        with the first claim; the callers write those no claim took."""
        delivered = 0
        waiting = False
        self._take_woken()
        # Places named for this consumer that it cannot take: for the others.
        unserved: list[tuple[str, Position]] = []
        consuming = [(c, q) for c in list(self.channels) for q in list(c._active_queues)]
        # Start one queue further each time, so that a backlog on the first
        # queue cannot take all the prefetch capacity forever.
        self._turn += 1
        start = self._turn % len(consuming) if consuming else 0
        for channel, queue in consuming[start:] + consuming[:start]:
            if queue not in self._ready:
                continue
            no_ack = queue in channel._no_ack_queues
            limit = UNLIMITED_CLAIM if no_ack else channel.qos.can_consume_max_estimate()
            if limit is None:
                limit = UNLIMITED_CLAIM
            if limit <= 0 or (not no_ack and self._claim_waits(channel, limit)):
                waiting = waiting or limit > 0
                if (place := self._cursors.unserved(queue)) is not None:
                    unserved.append((queue, place))
                continue
            # Clear the flag before claiming: a NOTIFY that arrives with
            # the claim's reply (a message committed after the claim's
            # snapshot) sets it again and must not be lost.
            self._ready.discard(queue)
            position = WHOLE_QUEUE if no_ack else self._cursors.start(queue)
            wake_min = None if no_ack else self._wake_min(channel, queue, limit)
            try:
                rows = self.claim(
                    queue, limit, no_ack, settle=False, start=position, wake_min=wake_min
                )
            except BaseException as exc:
                self._waits_written.pop(queue, None)  # rolled back: not known
                self._cursors.rescan(queue)
                if isinstance(exc, STATEMENT_ERRORS):  # ConnectionLost too
                    self._ready.add(queue)  # nothing claimed: the work is still there
                raise
            if len(rows) >= limit:
                self._ready.add(queue)
            self._note_waits(queue, limit, wake_min, len(rows))
            rows.sort(key=lambda r: (-r[1], r[0]))
            if not no_ack:
                places = [(-r[1], r[0]) for r in rows]
                if (place := self._cursors.claimed(queue, places, limit)) is not None:
                    unserved.append((queue, place))
            began = time.monotonic()
            for i, row in enumerate(rows):
                try:
                    consumer = None if no_ack else self.consumer_id
                    raw = to_raw(row, self._lock_oid, consumer, self.origin, self._timeline)
                    self._deliver(raw, queue)
                except BaseException:
                    # The callback raised: the rest of this claim was never
                    # handed over, so give it back rather than hold it
                    # until the connection closes.
                    if not no_ack and i + 1 < len(rows):
                        self.unclaim([r[0] for r in rows[i + 1 :]])
                    raise
            if rows and time.monotonic() - began > BLOCKING_DELIVERY:
                self._blocked_at = time.monotonic()
            delivered += len(rows)
        if not waiting:
            self._claim_waiting_since = None
        for queue, place in unserved:
            payload = place_payload(queue, place)
            self.run("wake_consumers", channel=self.channel_name, payload=payload)
        if self._commit_pending and self._loop is not None:
            # The commit's reply (and NOTIFYs sent meanwhile) may have been
            # read with the claim's rows, into libpq's buffer: then the
            # socket never becomes readable for it, and nothing would read
            # them until this session's next statement. Take them now if
            # they are there; if not, their arrival makes the socket readable.
            self._settle(block=False)
        return delivered

    def _take_woken(self) -> None:
        """Mark the queues to claim from: those notifications woke, and
        those whose fallback time has come (pgbroker.broker.cursor)."""
        if woken := self._cursors.take_woken():
            self._ready |= woken

    def _wake_min(self, channel: Any, queue: str, limit: int) -> int | None:
        """How many places a claim must leave free for its consumer to wait
        for a wake-up (``claim`` in queries.sql): as many as make it claim
        at once when woken. In Celery's event loop, half the prefetch
        window (with less, ``_claim_waits`` puts the claim off); a consumer
        that runs the work itself (BLOCKING_DELIVERY) does not wait. None
        (the claim leaves it as it is) within WAITING_WRITE_EVERY of the
        last change."""
        written = self._waits_written.get(queue)
        if (
            written is not None
            and written[0] == self._registration
            and time.monotonic() - written[2] < WAITING_WRITE_EVERY
        ):
            return None
        if self._blocked_at is not None and time.monotonic() - self._blocked_at < BLOCKING_MEMORY:
            return limit + 1
        prefetch: int | None = channel.qos.prefetch_count
        if self._loop is not None and prefetch:
            return max(1, (prefetch + 1) // 2)
        return 1

    def _note_waits(self, queue: str, limit: int, wake_min: int | None, claimed: int) -> None:
        """What a claim made with ``wake_min`` wrote (the rule of ``waits``
        in ``claim``, queries.sql): when whether the consumer waits changed,
        the next change waits WAITING_WRITE_EVERY."""
        if wake_min is None:
            return
        waits = claimed < limit and limit - claimed >= wake_min
        written = self._waits_written.get(queue)
        if written is None or written[0] != self._registration or written[1] != waits:
            self._waits_written[queue] = (self._registration, waits, time.monotonic())

    def _claim_waits(self, channel: Any, free: int) -> bool:
        """Whether to put a claim of ``free`` messages off (see
        CLAIM_BATCH_WAIT): only in Celery's event loop, whose timer claims
        when the wait is over, and only while the consumer holds more than
        half of its prefetch window, so that the worker has messages to run
        meanwhile. A prefetch of 1 or 2 claims each free slot at once."""
        prefetch = channel.qos.prefetch_count
        if self._loop is None or not prefetch or free * 2 >= prefetch:
            return False
        now = time.monotonic()
        if self._claim_waiting_since is None:
            self._claim_waiting_since = now
        return now - self._claim_waiting_since < CLAIM_BATCH_WAIT

    # --- acks -----------------------------------------------------------------------

    def ack(self, delivery_tag: int) -> None:
        held = self._held.get(delivery_tag)
        if held is not None and (held.registration != self._registration or self._session_gone()):
            # Delivered by a session that is gone: the next one writes it.
            self._orphan([delivery_tag])
            if self.consumer_id is not None:
                self._flush_orphans()
            return
        self._acks.append(delivery_tag)
        # Acks made while messages are being delivered (inside drain_events,
        # or in the event loop's thread) are written together at the end of
        # that delivery or tick, in one statement; any other ack at once.
        # Until written, an ack's message may be redelivered if the process
        # dies: delivery is at-least-once either way.
        if self._defer_acks or (
            self._loop is not None and threading.get_ident() == self._loop_thread
        ):
            return
        self.flush_acks()

    def flush_acks(self) -> None:
        if _orphaned.get(self._orphan_key) and self.consumer_id is not None:
            self._flush_orphans()
        if not self._acks:
            return
        if self.consumer_id is None:  # no session has started: none to write them
            self._orphan(self._unwritten_acks())
            return
        ids, self._acks = self._acks, []
        try:
            self.run_count("ack", ids=ids, consumer_id=self.consumer_id)
        except BaseException:
            self._acks = ids + self._acks  # kept: retried, or sent by the next session
            if self._session_gone():
                self._orphan(self._unwritten_acks())
            raise
        for tag in ids:
            self._held.pop(tag, None)

    # --- acks whose session is gone ------------------------------------------------

    def _unride(self) -> None:
        """The claim that carried acks failed: they are pending again."""
        if self._riding:
            self._acks = self._riding + self._acks
            self._riding = []

    def _rode(self) -> None:
        """The claim that carried acks committed: they are written."""
        for tag in self._riding:
            self._held.pop(tag, None)
        self._riding = []

    def _unwritten_acks(self) -> list[int]:
        self._unride()
        tags, self._acks = self._acks, []
        return tags

    def _orphan(self, tags: list[int]) -> None:
        """Keep acks whose session is gone for the process's next session on
        this broker (any transport of the same URL and schema), which writes
        them before it claims (``ack_orphaned`` in queries.sql): a message
        the application acknowledged is not delivered again because the
        connection was lost before its ack was written."""
        entries = []
        for tag in tags:
            held = self._held.pop(tag, None)
            if held is not None:
                entries.append(
                    _Orphan(
                        tag, held.consumer_id, held.delivery_count, held.published_at, held.timeline
                    )
                )
        if entries:
            with _orphaned_lock:
                _orphaned.setdefault(self._orphan_key, []).extend(entries)

    def _flush_orphans(self) -> None:
        with _orphaned_lock:
            entries = _orphaned.pop(self._orphan_key, [])
        if not entries:
            return
        # On another timeline (an asynchronous standby promoted, a restore)
        # the old server's last commits are lost, maybe with the work an ack
        # acknowledges: its message is delivered again (018_server_timeline).
        stale = [e for e in entries if e.timeline != self._timeline]
        if stale:
            entries = [e for e in entries if e.timeline == self._timeline]
            logger.warning(
                "%d ack(s) made for a lost session were not written: the server is on "
                "another timeline since their messages were claimed (a failover), and "
                "its lost commits may hold the work they acknowledge; those messages "
                "are delivered again",
                len(stale),
                extra=recovery(
                    "session_lost",
                    consumer=self.consumer_id,
                    count=len(stale),
                    reason="acks from another timeline",
                ),
            )
            if not entries:
                return
        try:
            written = self.run_count(
                "ack_orphaned",
                ids=[e.message_id for e in entries],
                consumer_ids=[e.consumer_id for e in entries],
                counts=[e.delivery_count for e in entries],
                published=[e.published_at for e in entries],
            )
        except BaseException:
            with _orphaned_lock:
                _orphaned.setdefault(self._orphan_key, [])[:0] = entries
            raise
        logger.info(
            "wrote %d of %d ack(s) made for a lost session (the others' messages "
            "were delivered again meanwhile)",
            written,
            len(entries),
            extra=recovery(
                "session_lost",
                consumer=self.consumer_id,
                count=written,
                reason="acks of a lost session",
            ),
        )

    def requeue(self, delivery_tags: list[int], counted: bool = True) -> None:
        """Hand messages back to their queues (logged in ``redelivery``).

        ``counted``: a reject with requeue, which counts towards
        ``max_deliveries`` (a message that reached it goes to dead_letter);
        off for messages handed back unprocessed when a channel closes.
        """
        tags = self._release(delivery_tags)
        if self.consumer_id is None or not tags:
            return
        row = self.run(
            "requeue",
            ids=tags,
            consumer_id=self.consumer_id,
            channel=self.channel_name,
            counted=counted,
            max_deliveries=self.options.max_deliveries,
            reason="requeued" if counted else "restored at close",
            schema_name=self.options.schema,
        )
        if row and row[2]:
            logger.warning(
                "%d requeued message(s) reached max_deliveries=%d: moved to the "
                "dead_letter table (reason 'max deliveries (requeued)')",
                row[2],
                self.options.max_deliveries,
                extra=recovery(
                    "dead_letter",
                    consumer=self.consumer_id,
                    count=row[2],
                    reason="max deliveries (requeued)",
                ),
            )

    def unclaim(self, delivery_tags: list[int]) -> None:
        """Hand back claimed messages that were never delivered."""
        tags = self._release(delivery_tags)
        if self.consumer_id is not None and tags:
            self.run(
                "unclaim",
                ids=tags,
                consumer_id=self.consumer_id,
                channel=self.channel_name,
            )

    def _release(self, delivery_tags: list[int]) -> list[int]:
        """Forget these deliveries; returns those that this session's
        consumer holds. A message claimed in an earlier session is the
        sweep's to hand back, and its id may name another message by now."""
        mine = []
        for tag in delivery_tags:
            held = self._held.pop(tag, None)
            if held is not None and held.registration == self._registration:
                mine.append(tag)
        return mine

    def dead_letter(self, delivery_tags: list[int]) -> None:
        tags = self._release(delivery_tags)
        if self.consumer_id is not None and tags:
            self.run_count("reject", ids=tags, consumer_id=self.consumer_id)

    # --- sweep ------------------------------------------------------------------------

    def sweep(self) -> tuple[int, int, int]:
        """Recover dead consumers' messages, drop expired messages, queues
        and results, promote due delayed messages, prune the dedup log (see
        ``sweep`` in queries.sql); housekeeping a batch at a time, the
        sweep run again while batches come back full for a bounded time.
        Returns (requeued, expired messages, expired queues)."""
        params = sweeper.sweep_params(self.options, self._lock_oid, sorted(self._attached))
        row = self.run("sweep", **params)
        log_sweep(row, self.options)
        requeued = int(row[0])
        expired_messages, expired_queues, left = sweep_more(self.run, self.options, params, row)
        if left:
            # More housekeeping than one pass: the next one soon, by this
            # process's sweeper thread (which knows of no backlog: it would
            # sleep a whole sweep_interval) or, without one, by this consumer.
            if self._sweeper is not None:
                self._sweeper.housekeep_soon()
            self._next_sweep = min(self._next_sweep, time.monotonic() + HOUSEKEEP_AGAIN)
        promoted = int(row[7])
        if promoted:
            logger.debug(
                "sweep promoted %d due delayed message(s)",
                promoted,
                extra=recovery("promote", consumer=self.consumer_id, count=promoted),
            )
        self._learn_due(row[9], row[10])
        if promoted >= PROMOTE_BATCH:
            self._due_at = time.monotonic()  # more are due: promote again now
        drop_dead_consumers_queues(self.run, row)
        return requeued, expired_messages, expired_queues

    def maybe_sweep(self) -> None:
        now = time.monotonic()
        if self.consumer_id is not None and now >= self._next_sweep:
            self._next_sweep = now + self.options.sweep_interval
            if not self._swept_elsewhere() and self._take_sweep(now):
                try:
                    self.sweep()
                except BaseException:
                    self._drop_sweep(now)  # a sibling sweeps instead
                    raise
        self.maybe_promote()

    def _take_sweep(self, now: float) -> bool:
        """Whether this consumer runs the periodic sweep now, or a consumer
        of the same process and broker did within ``sweep_interval``, for
        queues that include this one's (its promotion and next due time
        cover them): a sweep recovers every dead consumer of the schema,
        whoever runs it. Without this, 64 consumers starting together ran
        64 sweeps at once, and their first claims waited behind them."""
        key = self._orphan_key
        attached = frozenset(self._attached)
        with _sweeps_lock:
            last = _sweeps.get(key)
            if (
                last is not None
                and now - last[0] < self.options.sweep_interval
                and attached <= last[1]
            ):
                # Next when that sweep is due again (or ours, if sooner).
                self._next_sweep = min(self._next_sweep, last[0] + self.options.sweep_interval)
                return False
            _sweeps[key] = (now, attached)
            return True

    def _drop_sweep(self, now: float) -> None:
        with _sweeps_lock:
            if (last := _sweeps.get(self._orphan_key)) is not None and last[0] == now:
                del _sweeps[self._orphan_key]

    def _swept_elsewhere(self) -> bool:
        """The sweeper thread works (pgbroker.broker.sweeper): the periodic sweep
        of this consumer would only repeat it."""
        return self._sweeper is not None and self._sweeper.covers()


class _Orphan(NamedTuple):
    """An ack whose session was lost before it was written."""

    message_id: int
    consumer_id: int
    delivery_count: int
    published_at: datetime
    timeline: int | None


#: Acks whose session was lost before they were written, by (URL, schema).
#: See Transport._orphan.
_orphaned: dict[tuple[str, str], list[_Orphan]] = {}
_orphaned_lock = threading.Lock()


#: The last periodic sweep of a consumer of this process, by (URL, schema):
#: when (monotonic) and the queues it promoted (see _take_sweep).
_sweeps: dict[tuple[str, str], tuple[float, frozenset[str]]] = {}
_sweeps_lock = threading.Lock()


def _forget_orphans_after_fork() -> None:
    global _orphaned_lock, _sweeps_lock
    _orphaned_lock = threading.Lock()
    _orphaned.clear()  # the parent's to write
    _sweeps_lock = threading.Lock()
    _sweeps.clear()  # the parent's sweeps: the child sweeps for itself


os.register_at_fork(after_in_child=_forget_orphans_after_fork)
