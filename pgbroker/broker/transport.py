"""The Kombu transport: queues, exchanges and messages in PostgreSQL.

URL: ``postgresql://user:password@host:port/dbname?libpq-params`` (also
``postgres://`` and ``pgbroker://``). Options: :mod:`pgbroker.options`.

Where things are: this module holds :class:`Transport` (the Kombu protocol,
connect and close, publish, ``drain_events``, the session's statements and
notifications); its mixins hold the consumer session (claims, acks,
requeues, acks of a lost session, sweeps: :mod:`pgbroker.broker.consumer`),
Celery's event loop (:mod:`pgbroker.broker.loop`) and delayed delivery
(:mod:`pgbroker.broker.delayed`). The channel is in
:mod:`pgbroker.broker.channel`, a message's row in
:mod:`pgbroker.broker.messages`. Logger: ``pgbroker.broker``; recovery
actions carry the fields of :func:`pgbroker.logs.recovery`.

How it works, in short:

* One PostgreSQL session per Kombu connection, shared by its channels, in
  autocommit mode: every publish, claim and ack is its own commit, durable
  except a claim that carries no ack (docs/delivery.md, "What a server
  crash may undo").
* Publishing stores the message in the queues of the route the session
  cached, while that route's routing version is current, and NOTIFYs the
  message's place in the queue (:file:`sql/queries.sql`, ``publish``;
  :mod:`pgbroker.broker.cursor`); otherwise it routes
  in SQL against bindings stored in PostgreSQL (``publish_routing``) and
  caches the route (:mod:`pgbroker.broker.routing`).
* A consuming connection LISTENs. It claims messages only when a NOTIFY says
  a queue it consumes has work, or when the previous claim came back full;
  an idle consumer sends no query but the sweep (one per ``sweep_interval``).
  With Celery's event loop the session's socket is in the loop; without it,
  ``drain_events`` waits on the socket.
* Claims take up to the free prefetch count in one statement. Acks are
  batched per event-loop tick and fenced: only the consumer that holds a
  message can ack or requeue it.
* A claim hands its messages over as soon as the claiming statement has
  run, while its commit completes (libpq pipeline: the rows
  are flushed to us before the Sync that commits). Until the commit, the
  rows stay locked by the claiming transaction, so no other consumer can
  take them; the next statement on the session waits for the commit's
  reply first (``_settle``). The commit cannot fail while the session
  lives (``claim`` in :file:`sql/queries.sql`). Should it never
  happen (a lost session), the messages are redelivered, exactly as after a
  crash that follows a committed claim; acks made for a lost session are
  written by the process's next session (``_orphan``, docs/delivery.md).
* A consumer holds an advisory lock for as long as its session lives. The
  sweep hands the messages of consumers whose lock is gone back to their
  queues, and a live but slow consumer never loses its messages. The
  sweeper thread (:mod:`pgbroker.broker.sweeper`, ``fast_recovery``) watches the
  locks inside PostgreSQL and sweeps as soon as one is gone, so a SIGKILLed
  worker's tasks come back within about 0.2 s; without it, within one
  sweep interval.
* Delivery semantics for Celery tasks (docs/delivery.md): a future ``eta``
  keeps the message 'delayed' in PostgreSQL; each consumer keeps one timer
  for the earliest due time of its queues (learned at attach, from NOTIFYs
  on ``due_channel`` and from each promotion) and promotes then, so idle
  consumers send no extra query. ``expires`` caps the message's lifetime
  (expired tasks are dead-lettered and REVOKED by the sweep). A task message
  that the run of one message publishes again with the same (task id,
  retries), as a redelivered run does, is not stored again
  (``dedup_window``). A message handed out ``max_deliveries`` times goes to
  dead_letter, its task to FAILURE.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
import weakref
from typing import Any
from urllib.parse import quote

import psycopg
from kombu.transport import virtual
from psycopg import pq
from psycopg.adapt import Transformer
from psycopg.types.json import set_json_loads

from pgbroker.broker import enqueue, finish, header, sweeper
from pgbroker.broker.channel import Channel, check_name
from pgbroker.broker.consumer import BLOCKING_DELIVERY, ConsumerSession, Held
from pgbroker.broker.cursor import ClaimCursors
from pgbroker.broker.delayed import DelayedDelivery, due_channel_for
from pgbroker.broker.loop import EventLoop
from pgbroker.broker.messages import _load_json, log_publish_outcome, publish_params
from pgbroker.broker.routing import RouteCache, routing_channel_for
from pgbroker.database import pipeline, queries, schema
from pgbroker.database.forking import neutralise, process_key
from pgbroker.database.sessions import connect, plan_for_queue_tables
from pgbroker.errors import (
    CONNECTION_ERRORS,
    STATEMENT_ERRORS,
    ConfigurationError,
    ConnectionLost,
    wrap_exceptions,
)
from pgbroker.logs import recovery
from pgbroker.options import TransportOptions
from pgbroker.urls import mask_password

logger = logging.getLogger("pgbroker.broker")

#: Queries run through libpq's pipeline (``Transport._run_pipelined``): the
#: name of their prepared statement, and the type oid of each parameter.
_PIPELINED = {
    "claim": (
        b"pgbroker_claim",
        # 25 text, 20 bigint, 21 smallint, 23 integer, 1016 bigint[]
        {
            "queue": 25,
            "limit": 20,
            "consumer_id": 23,
            "acks": 1016,
            "from_priority": 21,
            "from_id": 20,
            "wake_min": 20,
        },
    ),
}

_PgChannel = Channel  # for annotations inside Transport, where Channel is an attribute


class Transport(ConsumerSession, EventLoop, DelayedDelivery, virtual.Transport):
    Channel = Channel
    client: Any

    default_port = 5432  # type: ignore[assignment]
    driver_type = "postgresql"
    driver_name = "psycopg"
    can_parse_url = True

    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False,
    )

    # Both from pgbroker.errors, where _statements classes psycopg's errors.
    # Celery reconnects on these, and a reconnection hands back every message
    # the consumer held: only a session that is gone (ConnectionLost) or
    # cannot be opened (DatabaseUnavailable), or a psycopg connection it
    # cannot use (InterfaceError). A session on a read-only server (a standby
    # after a failover) is a lost one: only a new session reaches the primary.
    connection_errors = (
        *virtual.Transport.connection_errors,
        *CONNECTION_ERRORS,
    )
    # The error of one statement on a session that still works: a statement
    # or lock timeout, a cancel, a serialization failure or deadlock, a full
    # disk. psycopg raises them as OperationalError,
    # as it does a lost session; but every lost session is ConnectionLost
    # (also an OperationalError, and listed above, which Kombu and Celery
    # test first). The consumer keeps its messages.
    channel_errors = (
        *virtual.Transport.channel_errors,
        *STATEMENT_ERRORS,
    )
    # Kombu's Connection.ensure (a publish with retry): reconnect on the
    # first, retry on the same session on the second.
    recoverable_connection_errors = connection_errors
    recoverable_channel_errors = STATEMENT_ERRORS

    channels: list[_PgChannel]

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)  # type: ignore[no-untyped-call]
        self.options = TransportOptions.from_mapping(dict(client.transport_options or {}))
        self.polling_interval = self.options.polling_interval
        self.url = _url_of(client)
        self.queries = queries.for_schema(self.options.schema)
        self.channel_name = self.options.schema  # NOTIFY channel
        # NOTIFY channel announcing delayed messages: "<due epoch> <queue>".
        self.due_channel = due_channel_for(self.options.schema)
        # NOTIFY channel announcing routing changes (015_routing_version.sql),
        # and the routes publish resolved (pgbroker.broker.routing).
        self.routing_channel = routing_channel_for(self.options.schema)
        self._routes = RouteCache()
        self._conn: psycopg.Connection | None = None
        self._lock_class = 0
        self._lock_oid = 0
        self.consumer_id: int | None = None
        self.origin: str | None = None
        self._listening = False
        self._attached: set[str] = set()
        # Queues that may have ready messages: set by NOTIFY and by full claims.
        self._ready: set[str] = set()
        self._cursors = ClaimCursors()
        self._acks: list[int] = []
        # Acks sent with a claim whose commit is not confirmed yet.
        self._riding: list[int] = []
        # Messages handed out by a claim, by delivery tag, so that an ack
        # can still apply after its session was lost (see _orphan).
        self._held: dict[int, Held] = {}
        self._registration = 0  # of its consumer, see Held
        self._timeline: int | None = None
        self._orphan_key = (self.url, self.options.schema)
        self._loop: Any = None
        self._loop_thread: int | None = None
        self._sweep_tref: Any = None
        self._wake_tref: Any = None  # LOOP_WAKE_INTERVAL
        self._next_sweep = 0.0
        self._turn = 0  # round robin over consumed queues
        self._claim_waiting_since: float | None = None  # see CLAIM_BATCH_WAIT
        self._claim_tref: Any = None  # claims when a batch's wait is over
        self._fallback_tref: Any = None  # claims when a fallback is due (cursor.py)
        self._woken = False  # a NOTIFY marked a queue ready
        # When the consumer last ran work in its callbacks (BLOCKING_DELIVERY).
        self._blocked_at: float | None = None
        self._waits_written: dict[str, tuple[int, bool, float]] = {}
        self._drained_at: float | None = None  # when drain_events last returned
        self._defer_acks = False
        self._sql: dict[str, bytes] = {}
        self._fd = -1  # the socket registered with the event loop
        # Serialises the session's use: a claim leaves its commit in flight.
        self._io = threading.RLock()
        self._commit_pending = False  # a claim's commit whose reply is unread
        self._prepared: set[bytes] = set()  # on the current connection
        # fast_recovery: this process's sweeper thread, once we consume.
        self._sweeper: sweeper.Sweeper | None = None
        # Delayed messages (ETA): the monotonic time when the earliest one
        # known in our queues is due (None: none known), learned at attach,
        # sweep and promote and from NOTIFYs on due_channel; and the server's
        # clock minus ours, so that due times (server time) become our times.
        self._due_at: float | None = None
        self._clock_offset = 0.0
        self._due_tref: Any = None  # the event loop's timer for _due_at
        self._retry_tref: Any = None  # after a statement's error in the loop
        self._due_armed: float | None = None
        # This session declared exclusive queues: they go when it closes.
        self._declared_exclusive = False

    # --- connection -----------------------------------------------------------

    def establish_connection(self) -> Transport:
        previous, self._conn = self._conn, self._open()
        self._commit_pending = False
        self._routes = RouteCache()  # a new session LISTENs to nothing yet
        self._prepared = set()
        if previous is not None:
            self._start_new_session(previous)
        super().establish_connection()  # type: ignore[no-untyped-call]
        return self

    def verify_connection(self, connection: Any) -> bool:
        return self._conn is not None and not self._conn.closed

    def _open(self) -> psycopg.Connection:
        # A session lost as it started (after connect()) is ConnectionLost.
        with wrap_exceptions():
            return self._prepare(connect(self.url, connect_timeout=self.client.connect_timeout))

    def _prepare(self, conn: psycopg.Connection) -> psycopg.Connection:
        try:
            if self.options.auto_migrate:
                schema.migrate(conn, self.options.schema)
            else:
                schema.require_current(conn, self.options.schema)
            # The schema's oid; and this session holds the process's key.
            row = conn.execute(
                self.queries["process_lock"],
                {"schema_name": self.options.schema, "process_key": process_key()},
            ).fetchone()
        except BaseException:
            conn.close()
            raise
        self._lock_oid = int(row[0]) if row else 0
        # pg_advisory_lock(int4, int4): the schema's oid as a signed int4.
        self._lock_class = (
            self._lock_oid - (1 << 32) if self._lock_oid >= 1 << 31 else self._lock_oid
        )
        plan_for_queue_tables(conn)
        conn.add_notify_handler(self._on_notify)
        set_json_loads(_load_json, conn)
        # Compose each query's text once per connection, not per call.
        self._sql = {name: q.as_bytes(conn) for name, q in self.queries.items()}
        _forget_after_fork.add(self)
        return conn

    def _start_new_session(self, previous: psycopg.Connection) -> None:
        """Reconnected on the same transport (Kombu's ensure_connection): the
        old session's consumer is gone, and with it every message it held,
        which the sweep requeues. Start over as a new consumer."""
        previous.close()
        self._orphan(self._unwritten_acks())  # sent by the new session
        queues, self._attached = self._attached, set()
        self.consumer_id = None
        self._cursors = ClaimCursors()  # NOTIFYs may have been lost meanwhile
        self._listening = False
        for queue in queues:
            self.attach(queue)
        if self._loop is not None:
            loop = self._loop
            self._unregister_loop()
            self.register_with_event_loop(self, loop)

    def close_connection(self, connection: Any) -> None:
        self._unregister_loop()
        try:
            # Closes the channels, which requeue their unacked messages.
            super().close_connection(connection)  # type: ignore[no-untyped-call]
            if self._conn is not None and not self._conn.closed:
                self.flush_acks()
                if self.consumer_id is not None:
                    self.run(
                        "unregister_consumer",
                        consumer_id=self.consumer_id,
                        channel=self.channel_name,
                        lock_class=self._lock_class,
                    )
                    if self._declared_exclusive:
                        self.run("drop_unused_queues", queue=None)
        except psycopg.Error as exc:
            logger.info(
                "closing after a database error; the sweep recovers the rest: %s",
                exc,
                extra=recovery(
                    "session_lost", consumer=self.consumer_id, reason=type(exc).__name__
                ),
            )
        finally:
            # Acks that could not be written: the process's next session for
            # this broker sends them (see _orphan).
            self._orphan(self._unwritten_acks())
            self.consumer_id = None
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            if self._sweeper is not None:
                given_back, self._sweeper = self._sweeper, None
                sweeper.release(given_back)

    @property
    def conn(self) -> psycopg.Connection:
        """The session, ready for a statement (a claim's commit has been read)."""
        conn = self._live()
        if self._commit_pending:
            self._settle()
        return conn

    def _session_gone(self) -> bool:
        return self._conn is None or self._conn.closed

    def _live(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            raise ConnectionLost("pgbroker: the connection to PostgreSQL is closed")
        return self._conn

    def _statements(self) -> contextlib.AbstractContextManager[None]:
        """Class a psycopg error by what it is (pgbroker.errors.wrap_exceptions):
        a session that is gone (whatever the error, if this session is
        closed) becomes ConnectionLost (a connection error: Kombu and Celery
        reconnect); a statement's own error (a timeout, a cancel, a
        serialization failure) is raised as it is, a channel error, marked
        for _in_loop."""
        return wrap_exceptions(self._session_gone)

    def as_uri(self, uri: str, include_password: bool = False, mask: str = "**") -> str:
        if "://" not in uri:  # switched to a failover URL: Kombu parsed it
            uri = self.url
        return uri if include_password else mask_password(uri, mask)

    def driver_version(self) -> str:
        return psycopg.__version__

    # --- running queries ------------------------------------------------------

    def run(self, query: str, /, **params: Any) -> Any:
        """Run a named query; return its first row (or None)."""
        with self._io, self._statements():
            cur = self.conn.execute(self._sql[query], params)
            return cur.fetchone() if cur.description else None

    def run_all(self, query: str, /, **params: Any) -> list[Any]:
        with self._io, self._statements():
            if query in _PIPELINED:
                return self._run_pipelined(query, params)
            return self.conn.execute(self._sql[query], params).fetchall()

    def run_count(self, query: str, /, **params: Any) -> int:
        with self._io, self._statements():
            return self.conn.execute(self._sql[query], params).rowcount

    # --- statements whose commit is not waited for ---------------------------------

    def _run_pipelined(self, query: str, params: dict[str, Any]) -> list[Any]:
        """Run a named query and return its rows without waiting for its commit.

        One round trip: Parse/Bind/Execute of the prepared statement, Flush
        (the server sends the rows at once), then Sync, which commits; the
        reply to the Sync is read by ``_settle``.
        """
        name, types = _PIPELINED[query]
        with self._io:
            conn = self.conn  # settles the previous one
            # The statement is its own transaction, committed by the Sync;
            # that commit cannot fail while the session lives (see `claim`
            # in queries.sql). A prepared statement: parsed once per session.
            text, names = pipeline.numbered(self._sql[query])
            # Every value in text before anything is sent (a value libpq
            # cannot take raises here, with nothing half sent).
            values = [_text_param(params[n], conn.info.encoding) for n in names]
            statements: list[bytes] = []  # those whose replies are read here
            with conn.lock:
                pipeline.enter(conn)
                self._commit_pending = True  # from here on, _settle cleans up
                if name not in self._prepared:
                    pipeline.prepare(conn, name, text, [types[n] for n in names])
                    self._prepared.add(name)
                    statements.append(b"prepare " + name)
                pipeline.send_prepared(conn, name, values)
                pipeline.request_flush(conn)  # its rows now, the commit later
                statements.append(name)
                pipeline.sync(conn)
                pipeline.flush(conn)
                rows: pq.abc.PGresult | None = None
                error: psycopg.Error | None = None
                for statement in statements:
                    while (res := pipeline.next_result(conn)) is not None:
                        # (None: the end of this statement's replies)
                        if pipeline.has_rows(res):
                            rows = res
                        elif (failed := pipeline.error(conn, res)) is not None:
                            error = error or failed
                            if statement.startswith(b"prepare "):
                                # prepared again next time
                                self._prepared.discard(statement[len(b"prepare ") :])
            if error is not None or rows is None:
                self._unride()  # the acks did not commit: they are pending again
                self._settle()
                raise error or psycopg.InternalError(f"pgbroker: {query} returned no rows")
            tx = Transformer(conn)
            tx.set_pgresult(rows)
            return tx.load_rows(0, rows.ntuples, tuple)

    def _settle(self, block: bool = True) -> bool:
        """Read the reply to a claim's commit and leave pipeline mode.

        Without ``block``, return False when the reply has not arrived yet.
        A failed commit raises here: the claim did not happen, and the acks
        that rode on it are pending again (retried, or after a lost session
        sent by the next one: see ``_orphan``).
        """
        with self._io, self._statements():
            if not self._commit_pending:
                return True
            try:
                conn = self._live()
                error: psycopg.Error | None = None
                with conn.lock:
                    if not block and not pipeline.ready(conn):
                        return False
                    while True:
                        res = pipeline.next_result(conn)
                        if res is None:
                            continue
                        if pipeline.is_sync(res):
                            break
                        error = error or pipeline.error(conn, res)
                    pipeline.leave(conn)
                    self._commit_pending = False
                if error is not None:
                    raise error
            except BaseException:
                self._unride()
                # Its rows are ready again, behind the claim's position.
                self._cursors.rescan_all()
                raise
            self._rode()
            self._dispatch_notifies(conn)
            return True

    # --- publishing -------------------------------------------------------------

    def publish(
        self, message: dict[str, Any], exchange: str, routing_key: str, channel: _PgChannel
    ) -> None:
        check_name("exchange", exchange)
        check_name("routing key", routing_key)
        params = publish_params(
            message,
            exchange,
            routing_key,
            priority=channel._get_message_priority(message),  # type: ignore[no-untyped-call]
            max_message_size=self.options.max_message_size,
            schema_oid=self._lock_oid if self.options.dedup_window > 0 else None,
        )
        headers: dict[str, Any] = params["headers"].obj
        # Inside pgbroker.enqueue_in(conn), the statement runs on the caller's
        # connection, in the caller's transaction.
        runner = enqueue.runner(self)
        own_session = runner is self
        if (
            own_session
            and not params["persistent"]
            and not params["dedup"]
            and self._unsent(exchange, routing_key, headers)
        ):
            return
        route = self._routes.lookup(exchange, routing_key)
        epoch = self._routes.epoch
        params.update(
            channel=self.channel_name,
            due_channel=self.due_channel,
            # Name a waiting consumer in the NOTIFY: it alone claims at
            # once (pgbroker/broker/cursor.py).
            wake_one=True,
            # The cached route: used by the statement if still current.
            version=route.version if route is not None else None,
            queues=list(route.queues) if route is not None else [],
            ttls=list(route.ttls) if route is not None else [],
        )
        # A task of a chord's header: held, and sent with the whole header
        # and its chord row in one transaction (pgbroker/broker/header.py).
        chord_header = header.current() if own_session else None
        if chord_header is not None:
            if chord_header.takes(params, self._fingerprint):
                chord_header.messages.append(params)
                if chord_header.last_next:
                    try:
                        self._send_header(chord_header)
                    except BaseException:
                        chord_header.messages.pop()  # Kombu's retry of this publish sends it all
                        raise
                    header.close()
                return
            self._send_header(chord_header)  # as Celery sent it; this publish as usual
            header.close()
        # The next link of a chain, sent by a task run as it finishes:
        # held for the transaction that stores the run's result.
        if own_session and finish.hold(self, params, self._fingerprint):
            return
        row = None
        if route is not None and route.queues:
            # A plain insert into the cached route's queues, unless a route
            # changed since (stale: nothing stored): then route in SQL.
            row = runner.run("publish", **params)
            if row and row[5]:
                row = None
        if row is None:
            row = runner.run("publish_routing", **params)
        if row and len(row) > 6 and row[6] is not None and own_session:
            # Routed in SQL (no route, or a stale one): this route, at this
            # version. Only from our own autocommit session: a caller's
            # transaction may see routing changes that never commit.
            self._routes.learn(epoch, row[5], exchange, routing_key, row[6], row[7], row[8])
        if row:
            log_publish_outcome(row, params)

    def _send_header(self, chord_header: header.Header) -> None:
        """Write a chord's row and what is held of its header (then its
        size, if set) in one pipelined transaction: one round trip, one
        commit. With the backend in another database (a surprise: the
        header was opened by a backend there), each on its own side."""
        broker = self._fingerprint()
        if chord_header.origin(broker) != broker:
            chord_header.run_elsewhere(chord_header.statements)
            chord_header.statements = []  # a retry does not write them again
            while chord_header.messages:
                params = chord_header.messages[0]
                row = self.run("publish_routing", **params)
                chord_header.messages.pop(0)
                if row:
                    log_publish_outcome(row, params)
            return
        sent: list[tuple[psycopg.Cursor[Any], dict[str, Any]]] = []
        with self._io, self._statements():
            conn = self.conn
            with pipeline.transaction(conn):
                for statement, params in chord_header.statements:
                    conn.execute(statement, params)
                for params in chord_header.messages:
                    cur = conn.cursor()
                    # Many messages at once: a wake-up for every consumer.
                    cur.execute(self._sql["publish_routing"], {**params, "wake_one": False})
                    sent.append((cur, params))
            rows = [(cur.fetchone(), params) for cur, params in sent]
        for row, params in rows:
            if row:
                log_publish_outcome(row, params)

    def _fingerprint(self) -> str:
        """Server, database and schema of this session (sql/enqueue.sql)."""
        return enqueue.broker_fingerprint(self, self.options.schema)

    def _unsent(self, exchange: str, routing_key: str, headers: dict[str, Any]) -> bool:
        """Whether a transient message with this cached route needs no
        statement at all (docs/delivery.md, "Routing from a cache"): it routes
        nowhere (the statement would drop it), or it is Celery's worker
        heartbeat and goes only to queues this process consumes (the
        worker's own gossip queue, which ignores the worker's own events).

        Only while the cache is watched: this session LISTENs on the routing
        channel, and the notifications that arrived are read first (each
        one drops the cache). The first transient message LISTENs first.
        """
        if not self._routes.watched:
            with self._io, self._statements():
                channel = psycopg.sql.Identifier(self.routing_channel)
                self.conn.execute(psycopg.sql.SQL("LISTEN {}").format(channel))
            self._routes.forget()  # learned before the LISTEN: not watched
            self._routes.watched = True
            return False
        # Notifications first (a socket read, no query): each drops the
        # cache; read now, they do not stop this statement's route from
        # being learned.
        self.read_notifies()
        current = self._routes.lookup(exchange, routing_key)
        if current is None:
            return False
        if not current.queues:
            return True
        return (
            routing_key == CELERY_HEARTBEAT
            and "hostname" in headers
            and all(_consumed_in_this_process(self, q) for q in current.queues)
        )

    # --- consuming without an event loop -----------------------------------------

    def drain_events(self, connection: Any, timeout: float | None = None, **kwargs: Any) -> None:
        """Deliver at least one message, or raise ``socket.timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._drained_at is not None and time.monotonic() - self._drained_at > BLOCKING_DELIVERY:
            # Away from drain_events that long: a wake-up could wait as long.
            self._blocked_at = time.monotonic()
        try:
            self._drain(deadline)
        finally:
            self._drained_at = time.monotonic()

    def _drain(self, deadline: float | None) -> None:
        while True:
            self._woken = False
            self.maybe_sweep()
            # Acks made by the callbacks go in one statement when they return.
            self._defer_acks = True
            try:
                delivered = self.claim_and_deliver()
            finally:
                self._defer_acks = False
            if delivered:
                # The callbacks ran while the claim committed; once this
                # returns, the claim is committed (the event loop settles
                # it when its reply makes the socket readable instead).
                self.flush_acks()
                self._settle()
                return
            # The claim's commit: NOTIFYs that came with its reply are read
            # with it, and the socket will not be readable for them.
            self._settle()
            if self._woken:
                continue  # a NOTIFY came with the reply to one of our queries
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError()
            wait = (
                self.polling_interval
                if remaining is None
                else min(remaining, self.polling_interval)
            )
            if self.consumer_id is not None:
                # Wake up for the next sweep, which may be due before the poll,
                # when the next delayed message is due, and for a fallback
                # claim (a publish named another consumer).
                wait = min(wait, self._next_sweep - time.monotonic())
                if self._due_at is not None:
                    wait = min(wait, self._due_at - time.monotonic())
                if (fallback := self._cursors.next_fallback()) is not None:
                    wait = min(wait, fallback - time.monotonic())
            readable, _, _ = select.select([self.conn.fileno()], [], [], max(wait, 0))
            if readable:
                self.read_notifies()

    # --- notifications ------------------------------------------------------------

    def _on_notify(self, notify: psycopg.Notify) -> None:
        if notify.channel == self.routing_channel:
            self._routes.forget()
        elif notify.channel == self.channel_name:
            if self._cursors.notified(notify.payload, self._attached, self.consumer_id):
                self._woken = True  # take_woken says which queues
        elif notify.channel == self.due_channel:
            if notify.payload == "sweeper":
                # A new process's standby: this process's sweeper may be
                # alone and only sweeping (see 009_sweeper_quiet.sql).
                if self._sweeper is not None:
                    self._sweeper.nudge()
                return
            due, _, queue = notify.payload.partition(" ")
            if queue in self._attached:
                with contextlib.suppress(ValueError):
                    self._learn_due(float(due))

    def read_notifies(self) -> None:
        """Read notifications that arrived while idle, without a query."""
        with self._io, self._statements():
            conn = self._live()
            # The socket may be readable for a claim's commit: take it if
            # it is there, never wait for it here.
            self._settle(block=False)
            self._dispatch_notifies(conn)

    def _dispatch_notifies(self, conn: psycopg.Connection) -> None:
        with conn.lock:
            pgconn = conn.pgconn
            pgconn.consume_input()
            enc = conn.info.encoding
            while (n := pgconn.notifies()) is not None:
                self._on_notify(
                    psycopg.Notify(n.relname.decode(enc), n.extra.decode(enc), n.be_pid)
                )
        self._take_woken()
        if pgconn.status != psycopg.pq.ConnStatus.OK:
            raise ConnectionLost("pgbroker: the connection to PostgreSQL was lost")


#: The routing key of Celery's worker heartbeat event (every 2 s by default).
CELERY_HEARTBEAT = "worker.heartbeat"


def _consumed_in_this_process(transport: Transport, queue: str) -> bool:
    """Whether a consumer session of this process, on the same broker,
    consumes ``queue``."""
    return any(
        queue in t._attached and t._orphan_key == transport._orphan_key and not t._session_gone()
        for t in list(_forget_after_fork._transports)
    )


def _text_param(value: Any, encoding: str) -> bytes | None:
    """A parameter in text format, for libpq (a list: an array of integers)."""
    if value is None:
        return None
    if isinstance(value, list):
        return ("{" + ",".join(str(int(v)) for v in value) + "}").encode()
    data = str(value).encode(encoding)
    if b"\0" in data:
        # libpq would cut the value at the NUL (another queue's name!).
        raise psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
    return data


def _url_of(client: Any) -> str:
    """The URL to connect to: the one the Kombu connection is on now.

    With ``can_parse_url``, Kombu hands over the whole URL as the hostname
    (libpq parameters included). Failover is the exception: Kombu's
    ``switch()`` to an alternate URL (``"postgresql://a;postgresql://b"``)
    always parses it into hostname, port, userid, password and
    virtual_host, so the URL is put together again from those.
    """
    _check_failover_urls(client)
    url = client.hostname or ""
    if "://" in url:
        return url
    user = quote(client.userid or "", safe="")
    if client.password:
        user += ":" + quote(str(client.password), safe="")
    host = url or "localhost"
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    port = f":{client.port}" if client.port else ""
    database = client.virtual_host if client.virtual_host not in (None, "", "/") else ""
    return f"postgresql://{user}{'@' if user else ''}{host}{port}/{quote(database, safe='')}"


def _check_failover_urls(client: Any) -> None:
    alternates = [a for a in client.alt or [] if isinstance(a, str)]
    if len(alternates) > 1 and any("?" in a for a in alternates):
        shown = ";".join(mask_password(a) for a in alternates)
        raise ConfigurationError(
            f"failover URLs {shown!r} carry libpq parameters (?...): Kombu's failover "
            "(Connection.switch) cannot pass them on. Set them in the environment "
            "instead (PGSSLMODE, PGCONNECT_TIMEOUT, PGAPPNAME...) or in a "
            "pg_service.conf service, and leave them out of the URLs"
        )


class _ForgetAfterFork:
    """In a forked child, every transport inherited from the parent lets go
    of the parent's session (see pgbroker.database.forking)."""

    def __init__(self) -> None:
        self._transports: weakref.WeakSet[Transport] = weakref.WeakSet()
        os.register_at_fork(after_in_child=self._after_fork)

    def add(self, transport: Transport) -> None:
        self._transports.add(transport)

    def _after_fork(self) -> None:
        for transport in list(self._transports):
            conn = transport._conn
            transport._conn = None
            transport._loop = None
            transport.consumer_id = None
            transport._sweeper = None  # the thread is not in the child (see sweeper)
            transport._due_at = transport._due_tref = transport._due_armed = None
            transport._retry_tref = None
            transport._commit_pending = False
            transport._acks, transport._riding, transport._held = [], [], {}
            transport._routes = RouteCache()
            transport._io = threading.RLock()  # may be held by a parent's thread
            if conn is not None and not conn.closed:
                neutralise(conn)
        self._transports = weakref.WeakSet()


_forget_after_fork = _ForgetAfterFork()
