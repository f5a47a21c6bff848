"""Fast crash recovery: one sweeper per schema notices dead consumers at once.

A consumer is a PostgreSQL session holding an advisory lock; when its
process dies, the lock goes with the session, and the sweep (``sweep`` in
:file:`sql/queries.sql`) hands its messages back. Without this module every
consumer runs the sweep every ``sweep_interval`` (10 s), so a SIGKILLed
worker's tasks come back after 5 s on average.

With ``fast_recovery`` (the default), every process that consumes also runs
one daemon thread per (URL, schema) with a session of its own
(``application_name`` ``pgbroker-sweeper:<host>:<pid>``), which calls
``sweeper_wait`` (:file:`migrations/007_sweeper.sql`, replaced by
:file:`migrations/009_sweeper_quiet.sql`) in a loop. Advisory
locks give the sessions of one schema their roles:

* the sweeper: the call polls ``pg_locks`` inside the server every
  :data:`POLL_SECONDS` and returns as soon as a consumer's lock is gone, or
  after ``sweep_interval``; the thread then runs the sweep and calls again.
  A SIGKILLed worker's messages are back in their queues well under a
  second later. Alone, with no other process's consumers to watch (its
  own die with it), it does not wait in the server: it keeps its lock and
  sends only the sweep every ``sweep_interval``, which also says whether
  another process has consumers now; then it calls again. A new process's
  standby nudges it at once (:meth:`Sweeper.nudge`, through a NOTIFY
  that this process's consumer session receives anyway); a process
  without a sweeper thread is noticed at the next sweep. The sweeper's
  session never LISTENs: every NOTIFY in the database (each publish, each
  result) would wake it;
* one standby: the call waits for the sweeper lock, so the standby becomes
  the sweeper the moment the sweeper's session ends (its process died: the
  server checks the client socket every 250 ms while a call runs, from
  PostgreSQL 14), and finds the dead consumers at once;
* the others are idle: their call returns at once, and the thread sleeps
  ``sweep_interval`` before the next, taking a role that has become free.

Either way the client sends one statement per ``sweep_interval`` (the
sweeper while other processes have consumers, two: the call and the
sweep), and the consumers' own periodic sweep is skipped while this thread
is healthy (:meth:`Sweeper.covers`): an idle worker sends at most two
statements per interval, a lone one only its sweep. The waits commit about
every second inside the procedure, so they never hold back the xmin horizon
for longer than that (see the migration for why).

The standby also sweeps when a consumer stays dead from one of its checks
to the next (under a second apart, see 013_expiry_and_standby.sql), and the
idle processes when consumers stay dead for a whole ``sweep_interval``: a
sweeper that is alive but stopped (SIGSTOP) or stuck does not stop
recovery. If this thread cannot work (connection lost, server restarting),
it logs, retries with backoff, and meanwhile the consumers' periodic sweep
runs as before: nothing depends on it but speed. It never raises into the
worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from pgbroker.database import queries
from pgbroker.database.forking import neutralise
from pgbroker.database.sessions import connect, default_application_name
from pgbroker.logs import recovery
from pgbroker.options import TransportOptions

logger = logging.getLogger("pgbroker.broker")

#: How often the sweeper looks for dead consumers, inside the server.
POLL_SECONDS = 0.2
#: How long the sweeper lets a dead consumer's process's other sessions end
#: before it sweeps (they hold the process's key: migrations/012_sessions_lost.sql).
SETTLE_SECONDS = 0.05
#: How often a sleeping thread looks for a nudge (no query: a flag).
NUDGE_POLL = 0.1
#: Backoff between attempts after an error, in seconds.
RETRY_FIRST = 1.0
RETRY_MAX = 30.0
#: How long closing waits for the thread.
STOP_TIMEOUT = 5.0
#: Seconds after the server shut the session down during which failures to
#: reconnect are logged at INFO (a restart), not WARNING.
SHUTDOWN_QUIET = 15.0


#: Delayed messages promoted per statement (run again while full).
PROMOTE_BATCH = 1000
#: published_task rows pruned per sweep (run again while full).
PRUNE_BATCH = 5000
#: Expired messages, results and groups removed per sweep (each kind).
HOUSEKEEP_BATCH = 2000
#: How long a sweep's housekeeping may go on (the sweep run again while a
#: batch comes back full); what is left goes on HOUSEKEEP_AGAIN later.
HOUSEKEEP_SECONDS = 0.5
HOUSEKEEP_AGAIN = 0.5

# Columns of the sweep's row (``sweep`` in sql/queries.sql).
EXPIRED_MESSAGES, EXPIRED_QUEUES, OTHERS, FULL, DEAD_CONSUMERS = 1, 2, 11, 13, 14


# --- the sweep statement, shared by the transport and the sweeper thread --------------


def sweep_params(
    options: TransportOptions, lock_oid: int, queues: list[str], housekeep: bool = True
) -> dict[str, object]:
    """The parameters of the ``sweep`` query (sql/queries.sql); without
    ``housekeep``, recovery alone (batches of 0). (This process's host name
    and pid tell its consumers from others', for the ``others`` column.)"""
    return {
        "lock_oid": lock_oid,
        "channel": options.schema,
        "schema_name": options.schema,
        "max_deliveries": options.max_deliveries,
        "queues": queues,
        "promote_limit": PROMOTE_BATCH,
        # With deduplication off here, rows other publishers wrote still go
        # after the default window.
        "dedup_window": options.dedup_window or TransportOptions.dedup_window,
        "prune_limit": PRUNE_BATCH if housekeep else 0,
        "housekeep_limit": HOUSEKEEP_BATCH if housekeep else 0,
        "own_host": socket.gethostname(),
        "own_pid": os.getpid(),
    }


def log_sweep(row: Any, options: TransportOptions) -> None:
    """Say what a sweep did (its row from the ``sweep`` query)."""
    requeued, expired_messages, expired_queues = int(row[0]), int(row[1]), int(row[2])
    dead_lettered, expired_tasks = int(row[4]), int(row[5])
    if requeued:
        logger.warning(
            "requeued %d message(s) held by consumers whose sessions ended",
            requeued,
            extra=recovery("requeue", count=requeued, reason="consumer session ended"),
        )
    if dead_lettered:
        logger.warning(
            "%d message(s) held by consumers whose sessions ended had been delivered "
            "max_deliveries=%d times: moved to the dead_letter table "
            "(reason 'max deliveries (consumer died)')",
            dead_lettered,
            options.max_deliveries,
            extra=recovery(
                "dead_letter", count=dead_lettered, reason="max deliveries (consumer died)"
            ),
        )
    if expired_tasks:
        logger.info(
            "%d expired task message(s) removed unread: REVOKED, kept in the "
            "dead_letter table (reason 'expired')",
            expired_tasks,
            extra=recovery("dead_letter", count=expired_tasks, reason="expired"),
        )
    if expired_messages or expired_queues:
        logger.debug(
            "removed %d expired message(s), %d expired queue(s)", expired_messages, expired_queues
        )


def sweep_more(
    run: Callable[..., Any],
    options: TransportOptions,
    params: dict[str, object],
    row: Any,
    budget: float = HOUSEKEEP_SECONDS,
) -> tuple[int, int, bool]:
    """After a sweep whose housekeeping batch came back full, sweep again
    (each its own transaction; ``run("sweep", **params)`` returns the row)
    while batches come back full, for up to ``budget`` seconds. Returns the
    expired messages and queues removed by these sweeps and ``row``, and
    whether more is left for the next pass. (Each sweep also recovers: a
    consumer that dies meanwhile waits for no backlog.)"""
    deadline = time.monotonic() + budget
    expired_messages, expired_queues = int(row[EXPIRED_MESSAGES]), int(row[EXPIRED_QUEUES])
    while row[FULL] and time.monotonic() < deadline:
        row = run("sweep", **params)
        log_sweep(row, options)
        expired_messages += int(row[EXPIRED_MESSAGES])
        expired_queues += int(row[EXPIRED_QUEUES])
    return expired_messages, expired_queues, bool(row[FULL])


def drop_dead_consumers_queues(run: Callable[..., Any], row: Any) -> None:
    """After a sweep that removed dead consumers (its ``dead_consumers``
    column), drop the auto-delete queues they were the last consumers of and
    the exclusive queues they declared (``run("drop_unused_queues", ...)``
    runs the named query and returns its row)."""
    if int(row[DEAD_CONSUMERS]):
        dropped = run("drop_unused_queues", queue=None)
        if dropped and dropped[0]:
            logger.info(
                "dropped %d auto-delete or exclusive queue(s) of consumers whose sessions ended",
                dropped[0],
                extra=recovery("sweep", count=dropped[0], reason="consumer session ended"),
            )


class Sweeper:
    """The sweeper thread of one (URL, schema) in this process.

    Get it with :func:`acquire`, give it back with :func:`release`.
    """

    def __init__(self, url: str, options: TransportOptions) -> None:
        self.url = url
        self.options = options
        self.schema = options.schema
        self.interval = options.sweep_interval
        #: "sweeper", "standby" or "idle" (see 007_sweeper.sql).
        self.role = "idle"
        #: Sweeps run by this thread (for tests and curious operators).
        self.sweeps = 0
        self._users = 0
        self._sql = queries.for_schema(options.schema, "sweeper.sql")
        self._sweep_sql = queries.for_schema(options.schema)
        self._conn: psycopg.Connection | None = None
        self._session_name = ""
        #: True while this process is the sweeper and alone: the thread only
        #: sweeps, every sweep_interval, without calling.
        self.alone = False
        self._lock_oid = 0
        self._last_ok: float | None = None  # when a call (or a lone sweep) last returned
        self._served = False  # a call returned on the current session
        self._backlog = False  # housekeeping left work for its next pass
        self._stuck_warned: set[int] = set()
        self._stopping = threading.Event()
        # Set by nudge(): a new process's standby announced itself.
        self._nudged = threading.Event()
        self._forked = False
        self._thread = threading.Thread(
            target=self._run, name=f"pgbroker-sweeper[{self.schema}]", daemon=True
        )

    # --- what the transport asks ---------------------------------------------

    def covers(self) -> bool:
        """True while this thread works: the consumers of this process may
        skip their own periodic sweep. A call lasts at most sweep_interval,
        so a thread silent for two intervals is stuck or reconnecting."""
        last = self._last_ok
        return (
            not self._forked
            and self._thread.is_alive()
            and last is not None
            and time.monotonic() - last < 2 * self.interval + 1.0
        )

    def nudge(self) -> None:
        """A new process consumes (its standby's NOTIFY, read by this
        process's transport): a lone sweeper calls again at once, so that
        it watches the new consumers from now on, not from its next sweep."""
        self._nudged.set()

    def housekeep_soon(self) -> None:
        """A consumer's own sweep left housekeeping for a next pass (as
        before this thread covered it): the thread's next pass comes after
        HOUSEKEEP_AGAIN, not sweep_interval (a lone sweeper wakes for it)."""
        self._backlog = True
        self._nudged.set()

    # --- the thread ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the thread and close its session (a standby elsewhere takes
        over at once if this one was the sweeper)."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            conn = self._conn
            if conn is not None and not conn.closed:
                # Interrupt the wait; the thread sees _stopping and leaves.
                with contextlib.suppress(Exception):
                    conn.cancel_safe(timeout=2.0)
            self._thread.join(0.2)
        if self._thread.is_alive():
            logger.warning(
                "pgbroker sweeper of schema %r did not stop within %.0f s; "
                "its session ends with the process",
                self.schema,
                timeout,
            )

    def _run(self) -> None:
        delay = RETRY_FIRST
        quiet_until = 0.0
        while not self._stopping.is_set():
            self._served = False
            try:
                self._connect()
                self._serve()
            except Exception as exc:  # never let the thread die, never raise into the worker
                if self._stopping.is_set():
                    break
                if self._served:
                    delay = RETRY_FIRST  # it worked until now: a new failure
                # The server shutting down (or an operator ending this
                # session) is not a failure: said at INFO, as are failures to
                # reconnect for SHUTDOWN_QUIET seconds (a restart), so that a
                # process that outlives its server by a moment (the examples
                # with an embedded server) ends silently.
                if isinstance(exc, psycopg.errors.AdminShutdown):
                    quiet_until = time.monotonic() + SHUTDOWN_QUIET
                logger.log(
                    logging.INFO if time.monotonic() < quiet_until else logging.WARNING,
                    "pgbroker sweeper of schema %r: %s: %s; retrying in %.0f s "
                    "(meanwhile consumers sweep every sweep_interval=%g s)",
                    self.schema,
                    type(exc).__name__,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                    delay,
                    self.interval,
                    extra=recovery("reconnect", reason=type(exc).__name__),
                )
            finally:
                self._disconnect()
            if self._stopping.wait(delay):
                break
            delay = min(delay * 2, RETRY_MAX)

    def _connect(self) -> None:
        # Its calls wait by design: no role's statement or lock timeout.
        self._conn = connect(self.url, connect_timeout=10, waits=True)
        name = self._conn.info.parameter_status("application_name")
        if name is None or name == default_application_name():
            # Not set in the URL: mark the session as the sweeper's.
            name = f"pgbroker-sweeper:{socket.gethostname()}:{os.getpid()}"
        self._session_name = name
        self.role = "idle"

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        self._last_ok = None  # the consumers sweep again until a call works
        if self.is_sweeper:
            logger.info("pgbroker sweeper of schema %r: no longer the sweeper", self.schema)
        self.role = "idle"
        self.alone = False
        if conn is not None and not self._forked:
            with contextlib.suppress(Exception):
                conn.close()

    @property
    def is_sweeper(self) -> bool:
        """True while this process's session holds the sweeper lock."""
        return self.role == "sweeper"

    def _serve(self) -> None:
        """Call, sweep when needed, call... until stopped or an error."""
        known: list[int] = []  # dead consumers our last sweep handled
        previous: list[int] = []  # dead consumers at the last call
        last_sweep = time.monotonic()
        # A short first wait: the thread shows it works (covers()) soon.
        wait = min(self.interval, 1.0)
        while not self._stopping.is_set() and self._conn is not None:
            conn = self._conn
            # Cleared before the call, so that a nudge that comes while it
            # runs is not lost: the call may not see the new consumer yet.
            self._nudged.clear()
            row = conn.execute(
                self._sql["wait"],
                {
                    "wait_seconds": wait,
                    "poll_seconds": POLL_SECONDS,
                    "known": known,
                    "own_host": socket.gethostname(),
                    "own_pid": os.getpid(),
                    "session_name": self._session_name,
                },
            ).fetchone()
            assert row is not None
            role, self._lock_oid = str(row[0]), int(row[1])
            dead, stale = list(row[2] or ()), list(row[3] or ())
            queue_names, waited = list(row[4] or ()), bool(row[5])
            # A housekeeping backlog: its next pass comes soon, between waits.
            wait = HOUSEKEEP_AGAIN if self._backlog else self.interval
            self._served = True
            self._last_ok = time.monotonic()
            if role != self.role and "sweeper" in (role, self.role):
                logger.info(
                    "pgbroker sweeper of schema %r: this process %s the sweeper",
                    self.schema,
                    "is now" if role == "sweeper" else "is no longer",
                )
            self.role = role
            if role == "sweeper":
                self._warn_stuck(dead, known)
                if set(dead) - set(known):
                    # A killed process's sessions end one by one: let its
                    # other sessions go too, so that the sweep does not take
                    # the death for a lost session (see 012_sessions_lost.sql).
                    self._stopping.wait(SETTLE_SECONDS)
                    # Urgent: recovery alone, then housekeeping in batches.
                    self._sweep(conn, queue_names, housekeep=False)
                    self._sweep(conn, queue_names)
                    last_sweep = time.monotonic()
                elif self._backlog or time.monotonic() - last_sweep >= self.interval:
                    self._sweep(conn, queue_names)
                    last_sweep = time.monotonic()
                known = dead
            else:
                if role == "idle":
                    stale = sorted(set(dead) & set(previous))
                if stale:
                    logger.warning(
                        "pgbroker sweeper of schema %r: consumer(s) %s stayed dead "
                        "without being swept (is the sweeper process stopped or stuck?): "
                        "sweeping here",
                        self.schema,
                        ", ".join(map(str, stale)),
                        extra=recovery(
                            "sweep", consumer=", ".join(map(str, stale)), reason="stayed dead"
                        ),
                    )
                    self._sweep(conn, queue_names)
                # A standby's next wait leaves the consumers it swept (if the
                # sweep could not remove them) to its end, not to every check.
                known = stale if role == "standby" else []
            previous = dead
            self._last_ok = time.monotonic()
            if not waited and role == "sweeper":
                # No other process's consumers to watch.
                self._sweep_alone(conn, queue_names)
                known, previous = [], []
                last_sweep = time.monotonic()
            elif not waited:
                self._sleep(conn)  # an idle process

    def _sweep_alone(self, conn: psycopg.Connection, queue_names: list[str]) -> None:
        """The lone sweeper keeps its role (the lock stays with the session)
        with no call: it sleeps and sweeps, every sweep_interval, until the
        sweep says that another process has consumers."""
        self.alone = True
        try:
            while not self._stopping.is_set():
                self._sleep(conn, HOUSEKEEP_AGAIN if self._backlog else self.interval)
                if self._stopping.is_set() or self._nudged.is_set():
                    return
                if self._sweep(conn, queue_names):
                    return
                self._last_ok = time.monotonic()
        finally:
            self.alone = False

    def _sleep(self, conn: psycopg.Connection, seconds: float | None = None) -> None:
        """Wait sweep_interval (or ``seconds``) without a query, watching the
        socket so that a session the server ended is noticed at once; a
        nudge ends it."""
        deadline = time.monotonic() + (self.interval if seconds is None else seconds)
        while not self._stopping.is_set() and not self._nudged.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            readable, _, _ = select.select([conn.fileno()], [], [], min(remaining, NUDGE_POLL))
            if readable:
                with conn.lock:
                    conn.pgconn.consume_input()
                if conn.pgconn.status != psycopg.pq.ConnStatus.OK:
                    raise psycopg.OperationalError("the connection to PostgreSQL was lost")

    def _warn_stuck(self, dead: list[int], known: list[int]) -> None:
        """Consumers still dead after a sweep: the sweep does not see them as
        dead (their lock scheme and ours differ). Say so once each."""
        stuck = [c for c in dead if c in known and c not in self._stuck_warned]
        if stuck:
            self._stuck_warned.update(stuck)
            logger.warning(
                "pgbroker sweeper of schema %r: consumer(s) %s hold no advisory lock but "
                "the sweep did not remove them; this is a bug, please report it",
                self.schema,
                ", ".join(map(str, stuck)),
            )

    def _sweep(
        self, conn: psycopg.Connection, queue_names: list[str], housekeep: bool = True
    ) -> bool:
        """Run the transport's sweep on this session (without ``housekeep``,
        recovery alone), and again while its housekeeping has more for up
        to HOUSEKEEP_SECONDS; log as the transport does. True if other
        processes have live consumers."""
        params = sweep_params(self.options, self._lock_oid, list(queue_names), housekeep)

        def run(name: str, **params: Any) -> Any:
            # Prepared at once, not after psycopg's five runs: a lone sweeper
            # sends only this statement, so it should not be parsed each time.
            return conn.execute(self._sweep_sql[name], params, prepare=True).fetchone()

        row = run("sweep", **params)
        assert row is not None
        self.sweeps += 1
        log_sweep(row, self.options)
        if housekeep:
            self._backlog = sweep_more(run, self.options, params, row)[2]
        drop_dead_consumers_queues(run, row)
        return bool(row[OTHERS])


# --- one sweeper per (URL, schema) per process ---------------------------------

_lock = threading.Lock()
_sweepers: dict[tuple[str, str], Sweeper] = {}


def acquire(url: str, options: TransportOptions) -> Sweeper:
    """This process's sweeper of (url, schema), started on first use.

    The first caller's options apply (sweep_interval, max_deliveries...).
    """
    key = (url, options.schema)
    with _lock:
        sweeper = _sweepers.get(key)
        if sweeper is None:
            sweeper = _sweepers[key] = Sweeper(url, options)
            sweeper.start()
        sweeper._users += 1
    return sweeper


def release(sweeper: Sweeper) -> None:
    """Give a sweeper back; the last user stops it."""
    with _lock:
        if sweeper._forked:
            return
        sweeper._users -= 1
        if sweeper._users > 0:
            return
        key = (sweeper.url, sweeper.schema)
        if _sweepers.get(key) is sweeper:
            del _sweepers[key]
    sweeper.stop()


def _after_fork_in_child() -> None:
    """A forked child (Celery's prefork pool) has no sweeper thread: forget
    the parent's sweepers without touching their sessions (pgbroker.database.forking),
    so that they end with the parent."""
    global _lock
    _lock = threading.Lock()
    for sweeper in list(_sweepers.values()):
        sweeper._forked = True
        conn = sweeper._conn
        if conn is not None and not conn.closed:
            neutralise(conn)
    _sweepers.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
