"""Fast crash recovery (pgbroker/broker/sweeper.py), with real processes.

One process per schema is the sweeper: its thread waits inside PostgreSQL
for a consumer's advisory lock to go and then sweeps, so a SIGKILLed
consumer's messages come back in well under a second, with sweep_interval
left at its default 10 s. The other consuming processes are standbys that
take over the moment the sweeper's session ends.

Timing figures are printed (run with -s to see them); the asserts are
loose, since other tests load the machine.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from kombu import Connection, Consumer, Message, Producer, Queue

from pgbroker.broker import sweeper
from pgbroker.errors import ConfigurationError
from pgbroker.options import TransportOptions
from tests.kombu_helpers import Child, collect, drain_quietly, drain_until, rows, scalar, wait_for

# The file takes over a minute (real processes, sweeps at their intervals).
pytestmark = pytest.mark.slow

ODD_SCHEMA = 'Odd "schema" Name'
#: How the sweep statement starts, as the server sees it (pgbroker.database.queries).
SWEEP = "/* pgbroker sweep */"

# A consumer process: consumes QUEUE with prefetch PREFETCH and default
# options (sweep_interval 10 s unless SWEEP_INTERVAL, fast_recovery on unless
# FAST_RECOVERY=0);
# prints "ready <consumer id>", then "held <payloads>" once it holds HOLD
# messages (never acked); with FORK set, forks a child that reports what it inherited and sleeps.
CONSUMER = """
import os, sys, time
from kombu import Connection, Consumer, Queue
from pgbroker.broker import sweeper
hold = int(os.environ.get("HOLD", "0"))
got = []
options = {"schema": os.environ["SCHEMA"],
           "sweep_interval": float(os.environ.get("SWEEP_INTERVAL", "10")),
           "fast_recovery": os.environ.get("FAST_RECOVERY", "1") == "1"}
conn = Connection(os.environ["TEST_URL"], transport_options=options)
with Consumer(conn, [Queue(os.environ["QUEUE"])], callbacks=[lambda body, m: got.append(body)],
              prefetch_count=int(os.environ.get("PREFETCH", "10"))):
    try:
        conn.drain_events(timeout=0.1)
    except TimeoutError:
        pass
    print("ready", conn.transport.consumer_id, flush=True)
    if os.environ.get("FORK"):
        pid = os.fork()
        if pid == 0:
            print("forked", os.getpid(), not sweeper._sweepers,
                  conn.transport._sweeper is None, flush=True)
            time.sleep(120)
            os._exit(0)
    printed = False
    while True:
        try:
            conn.drain_events(timeout=1)
        except TimeoutError:
            pass
        if hold and len(got) >= hold and not printed:
            print("held", *sorted(got), flush=True)
            printed = True
"""


def process_state(pid: int) -> str:
    """The state letter of a process (R, S, T for stopped...), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def sweeper_name(pid: int) -> str:
    return f"pgbroker-sweeper:{socket.gethostname()}:{pid}"


def sweeper_holder(db: psycopg.Connection, schema: str = "pgbroker") -> str | None:
    """application_name of the session holding the schema's sweeper lock."""
    row = db.execute(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objid = 0 AND l.objsubid = 2"
        "   AND l.classid = (SELECT oid FROM pg_namespace WHERE nspname = %s)"
        "   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        [schema],
    ).fetchone()
    return None if row is None else str(row[0])


def waits_in_server(db: psycopg.Connection, name: str) -> bool:
    """The sweeper session ``name`` is in a sweeper_wait call (not alone)."""
    return bool(
        scalar(
            db,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            " AND state = 'active' AND query LIKE '%%sweeper_wait%%'",
            name,
        )
    )


def made_its_call(db: psycopg.Connection, name: str) -> bool:
    """The sweeper session ``name`` is in a sweeper_wait call or idle after one."""
    return bool(
        scalar(
            db,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            " AND state IN ('active', 'idle') AND query LIKE '%%sweeper_wait%%'",
            name,
        )
    )


def sessions_named(db: psycopg.Connection, name: str) -> int:
    return int(
        scalar(
            db,
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = %s AND datname = current_database()",
            name,
        )
    )


def publish(url: str, queue: str, n: int, schema: str = "pgbroker") -> None:
    with Connection(url, transport_options={"schema": schema}) as conn:
        producer = Producer(conn.default_channel)
        for i in range(n):
            producer.publish(i, routing_key=queue, declare=[Queue(queue)])


def start_consumer(url: str, queue: str, schema: str = "pgbroker", **env: str) -> Child:
    child = Child(CONSUMER, url, QUEUE=queue, SCHEMA=schema, **env)
    line = child.read_line(30)
    assert line.startswith("ready"), line
    return child


def kill(child: Child) -> float:
    """SIGKILL the child; return the monotonic time of the kill."""
    os.kill(child.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    child.proc.wait(timeout=10)
    return killed_at


# --- recovery time --------------------------------------------------------------


def test_sigkilled_consumer_is_recovered_by_the_sweeper_at_once(
    db_url: str, db: psycopg.Connection
) -> None:
    """The test process is the sweeper; a consumer holding messages is
    SIGKILLed; its messages are redelivered within a second or so, not
    after sweep_interval (10 s)."""
    with Connection(db_url) as conn:
        assert conn.transport.options.sweep_interval == 10.0
        idle = Consumer(conn, [Queue("idle")], callbacks=[collect([])])
        idle.consume()
        drain_quietly(conn, 0.2)
        own = conn.transport._sweeper
        assert own is not None
        wait_for(lambda: own.is_sweeper, 15)
        assert sweeper_holder(db) == sweeper_name(os.getpid())

        publish(db_url, "work", 3)
        with start_consumer(db_url, "work", HOLD="3", PREFETCH="3") as holder:
            assert holder.read_line() == "held 0 1 2"
            got: list[Message] = []
            Consumer(conn, [Queue("work")], callbacks=[collect(got)]).consume()
            # Alone until now, the sweeper notices the new process at its
            # next sweep (within sweep_interval) and then watches it.
            drain_until(conn, lambda: waits_in_server(db, sweeper_name(os.getpid())), timeout=15)
            assert got == []  # the holder has them
            killed_at = kill(holder)
            drain_until(conn, lambda: len(got) == 3, timeout=15)
            elapsed = time.monotonic() - killed_at
    print(f"\nSIGKILL -> redelivered (this process the sweeper): {elapsed:.2f} s")
    assert elapsed < 3.0, elapsed
    assert sorted(m.payload for m in got) == [0, 1, 2]
    assert all(m.delivery_info["redelivered"] for m in got)
    assert rows(db, "SELECT reason, count(*) FROM pgbroker.redelivery GROUP BY 1") == [
        ("consumer died", 3),
        ("restored at close", 3),  # by this process's close, unacked
    ]


def test_sweeper_role_moves_when_the_sweeper_process_is_killed(
    db_url: str, db: psycopg.Connection
) -> None:
    """The killed consumer was the sweeper itself (in a schema whose name
    needs quoting): this process's standby takes the role over as the
    sweeper's session ends and recovers the messages at once."""
    publish(db_url, "work", 3, schema=ODD_SCHEMA)
    with start_consumer(db_url, "work", ODD_SCHEMA, HOLD="3", PREFETCH="3") as holder:
        assert holder.read_line() == "held 0 1 2"
        wait_for(lambda: sweeper_holder(db, ODD_SCHEMA) == sweeper_name(holder.proc.pid), 15)
        with Connection(db_url, transport_options={"schema": ODD_SCHEMA}) as conn:
            got: list[Message] = []
            with Consumer(conn, [Queue("work")], callbacks=[collect(got)]):
                drain_quietly(conn, 1.0)
                own = conn.transport._sweeper
                assert own is not None
                wait_for(own.covers, 10)  # a standby: no periodic sweep of its own
                assert own.role == "standby"
                killed_at = kill(holder)
                drain_until(conn, lambda: len(got) == 3, timeout=15)
                elapsed = time.monotonic() - killed_at
                assert own.is_sweeper
                assert sweeper_holder(db, ODD_SCHEMA) == sweeper_name(os.getpid())
    print(f"\nSIGKILL of the sweeper process -> redelivered by the new sweeper: {elapsed:.2f} s")
    assert elapsed < 3.0, elapsed
    assert sorted(m.payload for m in got) == [0, 1, 2]
    table = psycopg.sql.Identifier(ODD_SCHEMA, "redelivery")
    query = psycopg.sql.SQL("SELECT count(*) FROM {} WHERE reason = 'consumer died'")
    assert db.execute(query.format(table)).fetchone() == (3,)


def test_live_busy_consumer_keeps_its_messages_while_the_sweeper_polls(
    db_url: str, db: psycopg.Connection
) -> None:
    """The sweeper looks at the consumers' locks five times a second and
    sweeps every sweep_interval: a consumer that is alive keeps its
    messages however long it holds them."""
    with Connection(db_url, transport_options={"sweep_interval": 0.3}) as conn:
        got: list[Message] = []
        with Consumer(conn, [Queue("other")], callbacks=[collect(got)]):
            drain_quietly(conn, 0.2)
            own = conn.transport._sweeper
            assert own is not None
            wait_for(lambda: own.is_sweeper, 15)
            publish(db_url, "work", 2)
            with start_consumer(db_url, "work", HOLD="2", PREFETCH="2") as holder:
                assert holder.read_line() == "held 0 1"
                before = own.sweeps
                drain_quietly(conn, 2.5)
                assert own.sweeps - before >= 4, own.sweeps - before
                assert holder.proc.poll() is None
                assert rows(db, "SELECT state, count(*) FROM pgbroker.message GROUP BY 1") == [
                    ("reserved", 2)
                ]
                # (Checked while the holder lives: once it is killed on the way
                # out, the sweeper may requeue its messages before this closes.)
                assert scalar(db, "SELECT count(*) FROM pgbroker.redelivery") == 0
                assert got == []


# --- idle cost ------------------------------------------------------------------


class StatementCounter:
    """A TCP proxy in front of PostgreSQL that counts the statements its
    clients send (simple Query and extended-protocol Execute messages)."""

    def __init__(self, server_url: str) -> None:
        parts = urlsplit(server_url)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.statements: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        """Stop accepting and close every connection (their threads end)."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def __enter__(self) -> StatementCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, url: str) -> str:
        parts = urlsplit(url)
        netloc = parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{self.port}"
        netloc_s = f"{netloc[0]}@{host}" if len(netloc) == 2 else host
        query = (parts.query + "&" if parts.query else "") + "sslmode=disable"
        return urlunsplit(parts._replace(netloc=netloc_s, query=query))

    def count(self, since: float, until: float) -> list[str]:
        with self._lock:
            return [text for at, text in self.statements if since <= at < until]

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.target)
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()
            threading.Thread(target=self._client, args=(client, server), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _client(self, client: socket.socket, server: socket.socket) -> None:
        buffer = b""
        started = False  # past the startup packet: typed messages
        parsed: dict[bytes, str] = {}
        bound: dict[bytes, str] = {}
        try:
            while True:
                readable, _, _ = select.select([client], [], [], 1.0)
                if not readable:
                    continue
                data = client.recv(65536)
                if not data:
                    break
                server.sendall(data)
                buffer += data
                while True:
                    if not started:
                        if len(buffer) < 8:
                            break
                        (length,) = struct.unpack("!I", buffer[:4])
                        if len(buffer) < length:
                            break
                        (code,) = struct.unpack("!I", buffer[4:8])
                        buffer = buffer[length:]
                        # SSLRequest / GSSENCRequest come before the startup packet.
                        started = code not in (80877103, 80877104)
                        continue
                    if len(buffer) < 5:
                        break
                    kind = buffer[:1]
                    (length,) = struct.unpack("!I", buffer[1:5])
                    if len(buffer) < 1 + length:
                        break
                    body, buffer = buffer[5 : 1 + length], buffer[1 + length :]
                    self._message(kind, body, parsed, bound)
        except OSError:
            pass

    def _message(
        self, kind: bytes, body: bytes, parsed: dict[bytes, str], bound: dict[bytes, str]
    ) -> None:
        if kind == b"Q":
            self._record(body.split(b"\0", 1)[0].decode(errors="replace"))
        elif kind == b"P":
            name, rest = body.split(b"\0", 1)
            parsed[name] = rest.split(b"\0", 1)[0].decode(errors="replace")
        elif kind == b"B":
            portal, rest = body.split(b"\0", 1)
            bound[portal] = parsed.get(rest.split(b"\0", 1)[0], "?")
        elif kind == b"E":
            self._record(bound.get(body.split(b"\0", 1)[0], "?"))

    def _record(self, text: str) -> None:
        with self._lock:
            self.statements.append((time.monotonic(), " ".join(text.split())))


@pytest.fixture
def counter(db_url: str) -> Iterator[StatementCounter]:
    with StatementCounter(db_url) as counter:
        yield counter


def xact_count(db: psycopg.Connection) -> int:
    return int(
        scalar(
            db,
            "SELECT xact_commit + xact_rollback FROM pg_stat_database"
            " WHERE datname = current_database()",
        )
    )


def test_idle_workers_send_at_most_two_statements_per_sweep_interval(
    db_url: str, db: psycopg.Connection, counter: StatementCounter
) -> None:
    """Three idle consumer processes (default sweep_interval, 10 s), each
    through its own counting proxy: the sweeper, watching the others'
    consumers, sends its call and its sweep once per interval, the standby
    and the idle process only their call; their consumer sessions send
    nothing (no periodic sweep while the sweeper thread works)."""
    window = 20.0
    with contextlib.ExitStack() as stack:
        counters = [counter, *(stack.enter_context(StatementCounter(db_url)) for _ in "ab")]
        children = []
        for c in counters:
            children.append(stack.enter_context(start_consumer(c.url(db_url), "idle")))
            if len(children) == 1:
                wait_for(lambda: sweeper_holder(db) == sweeper_name(children[0].proc.pid), 15)
        # Start-up is over once each process has made its call: the sweeper
        # (alone when it started, it waits in the server from its next sweep
        # on) and the standby wait in theirs, the idle process's returns.
        names = [sweeper_name(c.proc.pid) for c in children]
        wait_for(lambda: all(made_its_call(db, name) for name in names), 15)
        wait_for(lambda: all(waits_in_server(db, name) for name in names[:2]), 15)
        xacts = xact_count(db)
        start = time.monotonic()
        time.sleep(window)  # on purpose: the window in which statements are counted
        end = time.monotonic()
        xacts = xact_count(db) - xacts
        assert all(child.proc.poll() is None for child in children)
        assert sweeper_holder(db) == sweeper_name(children[0].proc.pid)
    sweeper_, standby, idle = (c.count(start, end) for c in counters)
    print(
        f"\nidle over {window:g} s, statements sent: sweeper process {len(sweeper_)}, "
        f"standby {len(standby)}, idle {len(idle)}; pg_stat_database transactions {xacts} "
        "(the sweeper's and the standby's waits commit about once a second in the server)"
    )
    assert len(sweeper_) <= 2 * window / 10, sweeper_
    assert len(standby) <= window / 10, standby
    assert len(idle) <= window / 10, idle
    # Nothing but the calls and the sweeps: the consumer sessions are silent.
    assert all(
        ("CALL" in s and "sweeper_wait" in s) or SWEEP in s for s in sweeper_ + standby + idle
    ), sweeper_ + standby + idle


def test_a_lone_worker_sends_only_its_sweep(
    db_url: str, db: psycopg.Connection, counter: StatementCounter
) -> None:
    """With no other process's consumers to watch (its own die with it), the
    sweeper keeps its lock and sends only the sweep, once per interval: no
    call, so no LISTEN either (which every NOTIFY in the database would
    wake). Its session is idle between sweeps, costing no transaction."""
    interval = 1.0
    began = time.monotonic()
    with start_consumer(counter.url(db_url), "idle", SWEEP_INTERVAL=str(interval)) as lone:
        name = sweeper_name(lone.proc.pid)
        wait_for(lambda: sweeper_holder(db) == name, 15)
        # Start-up is over once the sweeper has sent a sweep.
        wait_for(lambda: any(SWEEP in s for s in counter.count(began, time.monotonic())), 15)
        start = time.monotonic()
        states = []
        while time.monotonic() < start + 6.0:
            states.append(
                scalar(db, "SELECT state FROM pg_stat_activity WHERE application_name = %s", name)
            )
            time.sleep(0.1)
        end = time.monotonic()
        assert sweeper_holder(db) == name
    sent = counter.count(start, end)
    window = end - start
    print(f"\nlone worker over {window:.1f} s: {len(sent)} statements; states {set(states)}")
    assert states.count("idle") >= 0.9 * len(states), states
    assert window / interval - 2 <= len(sent) <= window / interval + 1, sent
    assert all(SWEEP in s for s in sent), sent


def test_the_sweeper_session_never_listens(db: psycopg.Connection) -> None:
    """sweeper_wait (as migrated) never LISTENs: on PostgreSQL every NOTIFY
    committed in the database wakes every listening backend. Its one NOTIFY
    (a new standby's nudge) goes to the due channel, which consumer
    sessions LISTEN on anyway."""
    source = scalar(
        db,
        "SELECT prosrc FROM pg_proc WHERE proname = 'sweeper_wait'"
        " AND pronamespace = 'pgbroker'::regnamespace",
    )
    assert "LISTEN" not in source.upper()
    assert source.upper().count("NOTIFY") == 1
    assert "'pgbd_' || pg_catalog.md5(" in source


def test_a_lone_sweeper_watches_a_new_process_at_once(db_url: str, db: psycopg.Connection) -> None:
    """A second process starts consuming: its standby nudges the lone
    sweeper (a NOTIFY on the due channel, read by the first process's
    consumer session), whose thread goes back to waiting in the server,
    watching the new consumers' locks, at once rather than at its next
    sweep (10 s here)."""
    with Connection(db_url) as conn:
        Consumer(conn, [Queue("idle")], callbacks=[collect([])]).consume()
        drain_quietly(conn, 0.2)
        own = conn.transport._sweeper
        assert own is not None and own.interval == 10
        name = sweeper_name(os.getpid())
        wait_for(lambda: own.alone, 15)
        assert own.is_sweeper and not waits_in_server(db, name)
        with start_consumer(db_url, "idle") as other:

            def watched() -> bool:
                drain_quietly(conn, 0.05)  # the consumer session reads the nudge
                return waits_in_server(db, name)

            wait_for(watched, 8)
            # From the new consumer's registration (server clock).
            elapsed = scalar(
                db,
                "SELECT extract(epoch FROM now() - started_at)::float8"
                " FROM pgbroker.consumer WHERE pid = %s",
                other.proc.pid,
            )
            assert own.is_sweeper and not own.alone
    print(f"\nnew process watched by the lone sweeper {elapsed:.2f} s after it registered")
    assert elapsed < 3.0, elapsed


def test_a_process_without_a_sweeper_is_watched_from_the_next_sweep(
    db_url: str, db: psycopg.Connection
) -> None:
    """A consumer with fast_recovery off has no standby to nudge the lone
    sweeper: the sweeper's next sweep says that other consumers exist, and
    its thread goes back to waiting in the server within one interval."""
    interval = 2.0
    with Connection(db_url, transport_options={"sweep_interval": interval}) as conn:
        Consumer(conn, [Queue("idle")], callbacks=[collect([])]).consume()
        drain_quietly(conn, 0.2)
        own = conn.transport._sweeper
        assert own is not None
        name = sweeper_name(os.getpid())
        wait_for(lambda: own.alone, 15)
        with start_consumer(db_url, "idle", FAST_RECOVERY="0") as other:
            wait_for(lambda: waits_in_server(db, name), interval + 5)
            # From the new consumer's registration (server clock).
            elapsed = scalar(
                db,
                "SELECT extract(epoch FROM now() - started_at)::float8"
                " FROM pgbroker.consumer WHERE pid = %s",
                other.proc.pid,
            )
            assert own.is_sweeper and not own.alone
    assert elapsed < interval + 1.0, elapsed


def test_waits_do_not_hold_the_xmin_horizon(db_url: str, db: psycopg.Connection) -> None:
    """While the sweeper and a standby wait (each call lasts 10 s), their
    sessions' transactions, and so their snapshots, never get older than
    about a second: VACUUM can clean the message table behind them."""
    with start_consumer(db_url, "idle") as first:
        wait_for(lambda: sweeper_holder(db) == sweeper_name(first.proc.pid), 15)
        with start_consumer(db_url, "idle") as second:
            # The first, alone until now, waits in the server from its next
            # sweep; the standby from its first call.
            wait_for(
                lambda: all(waits_in_server(db, sweeper_name(c.proc.pid)) for c in (first, second)),
                15,
            )
            samples: list[tuple[Any, ...]] = []
            deadline = time.monotonic() + 8.0
            while time.monotonic() < deadline:
                samples += db.execute(
                    "SELECT application_name, backend_xmin IS NULL,"
                    " extract(epoch FROM now() - xact_start)::float8,"
                    " extract(epoch FROM now() - query_start)::float8"
                    " FROM pg_stat_activity WHERE application_name LIKE 'pgbroker-sweeper:%%'"
                    "   AND state = 'active'"
                ).fetchall()
                time.sleep(0.2)
    held = [s for s in samples if not s[1]]
    oldest_xact = max(s[2] for s in samples)
    oldest_call = max(s[3] for s in samples)
    print(
        f"\n{len(samples)} samples of the sweeper sessions: backend_xmin NULL in "
        f"{len(samples) - len(held)}; oldest transaction {oldest_xact:.2f} s while the "
        f"calls ran up to {oldest_call:.2f} s"
    )
    assert {s[0] for s in samples} >= {sweeper_name(first.proc.pid)}
    assert oldest_call > 4.0  # the calls are long...
    assert oldest_xact < 3.0, oldest_xact  # ...their transactions are not


# --- robustness -------------------------------------------------------------------


def test_forked_children_do_not_keep_the_sweeper_session(
    db_url: str, db: psycopg.Connection
) -> None:
    """Celery's prefork children are forked from a process whose sweeper
    thread is running: they have no sweeper, and the parent's sessions end
    with the parent even while a child lives on."""
    with start_consumer(db_url, "idle", FORK="1") as parent:
        line = parent.read_line()
        _, grandchild, registry_empty, transport_forgot = line.split()
        assert (registry_empty, transport_forgot) == ("True", "True"), line
        try:
            name = sweeper_name(parent.proc.pid)
            wait_for(lambda: sweeper_holder(db) == name, 15)
            with Connection(db_url) as conn:
                Consumer(conn, [Queue("idle")], callbacks=[collect([])]).consume()
                drain_quietly(conn, 0.5)
                kill(parent)
                wait_for(lambda: sessions_named(db, name) == 0, 5)
                own = conn.transport._sweeper
                assert own is not None
                drain_until(conn, lambda: own.is_sweeper, timeout=5)
            os.kill(int(grandchild), 0)  # still alive, holding the inherited sockets
        finally:
            os.kill(int(grandchild), signal.SIGKILL)


def test_standbys_sweep_when_the_sweeper_is_alive_but_stuck(
    db_url: str, db: psycopg.Connection
) -> None:
    """A session holds the sweeper lock but never sweeps (a stuck process):
    a standby that sees the same consumers dead for a whole wait sweeps them
    itself, so recovery is slower (one or two sweep intervals) but happens."""
    oid = scalar(db, "SELECT oid FROM pg_namespace WHERE nspname = 'pgbroker'")
    lock_class = oid - (1 << 32) if oid >= 1 << 31 else oid
    with psycopg.connect(db_url, autocommit=True) as stuck:
        stuck.execute("SELECT pg_advisory_lock(%s, 0)", [lock_class])
        publish(db_url, "work", 2)
        with start_consumer(db_url, "work", HOLD="2", PREFETCH="2") as holder:
            assert holder.read_line() == "held 0 1"
            options = {"sweep_interval": 1.0}
            with Connection(db_url, transport_options=options) as conn:
                got: list[Message] = []
                with Consumer(conn, [Queue("work")], callbacks=[collect(got)]):
                    drain_quietly(conn, 1.5)
                    own = conn.transport._sweeper
                    assert own is not None
                    wait_for(own.covers, 10)
                    assert not own.is_sweeper
                    killed_at = kill(holder)
                    drain_until(conn, lambda: len(got) == 2, timeout=20)
                    elapsed = time.monotonic() - killed_at
                    # The thread counts its sweep after the statement returns;
                    # the consumer may deliver the requeued messages first.
                    wait_for(lambda: own.sweeps >= 1, 5)
                    assert not own.is_sweeper
    print(f"\nSIGKILL -> redelivered by a standby, the sweeper being stuck: {elapsed:.2f} s")


def test_a_lost_sweeper_session_is_reopened_and_consuming_goes_on(
    db_url: str, db: psycopg.Connection
) -> None:
    with Connection(db_url) as conn:
        got: list[Message] = []

        def on_message(body: Any, message: Message) -> None:
            got.append(message)
            message.ack()

        with Consumer(conn, [Queue("work")], callbacks=[on_message]):
            drain_quietly(conn, 0.2)
            name = sweeper_name(os.getpid())
            wait_for(lambda: sweeper_holder(db) == name, 15)

            def session() -> int | None:
                row = db.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = %s", [name]
                ).fetchone()
                return None if row is None else int(row[0])

            old = session()
            assert scalar(db, "SELECT pg_terminate_backend(%s)", old)
            own = conn.transport._sweeper
            assert own is not None
            # The thread logs, waits a second and opens a new session, which
            # takes the sweeper role again.
            wait_for(lambda: session() not in (None, old), 15)
            wait_for(lambda: sweeper_holder(db) == name, 15)
            wait_for(own.covers, 15)
            publish(db_url, "work", 1)
            drain_until(conn, lambda: len(got) == 1, timeout=10)


def test_closing_stops_the_thread_and_hands_the_role_over(
    db_url: str, db: psycopg.Connection
) -> None:
    conn = Connection(db_url)
    Consumer(conn, [Queue("idle")], callbacks=[collect([])]).consume()
    drain_quietly(conn, 0.2)
    name = sweeper_name(os.getpid())
    wait_for(lambda: sweeper_holder(db) == name, 15)
    own = conn.transport._sweeper
    assert own is not None
    with start_consumer(db_url, "idle") as other:
        closed_at = time.monotonic()
        conn.close()
        stopped = time.monotonic() - closed_at
        assert conn.transport._sweeper is None
        # (This thread: in a full run, other tests' connections may still
        # be closing theirs.)
        assert not own._thread.is_alive()
        assert own not in sweeper._sweepers.values()
        # (The server ends the backend after the client closed the socket.)
        wait_for(lambda: sessions_named(db, name) == 0, 5)
        # The standby becomes the sweeper as this session ends.
        wait_for(lambda: sweeper_holder(db) == sweeper_name(other.proc.pid), 5)
    print(f"\nclose() stopped the sweeper thread in {stopped:.2f} s")
    assert stopped < 3.0


def test_fast_recovery_off_keeps_the_periodic_sweep(db_url: str, db: psycopg.Connection) -> None:
    options = {"fast_recovery": False, "sweep_interval": 0.2}
    with Connection(db_url, transport_options=options) as conn:
        sweeps: list[Any] = []
        real = conn.transport.sweep

        def counted() -> Any:
            sweeps.append(real())
            return sweeps[-1]

        conn.transport.sweep = counted
        with Consumer(conn, [Queue("idle")], callbacks=[collect([])]):
            drain_quietly(conn, 1.5)
        assert conn.transport._sweeper is None
    assert len(sweeps) >= 4, sweeps
    assert sweeper_holder(db) is None
    assert sessions_named(db, sweeper_name(os.getpid())) == 0


def test_fast_recovery_must_be_a_boolean() -> None:
    assert TransportOptions().fast_recovery is True
    with pytest.raises(ConfigurationError, match="fast_recovery"):
        TransportOptions.from_mapping({"fast_recovery": "maybe"})


def standby_holder(db: psycopg.Connection, schema: str = "pgbroker") -> str | None:
    """application_name of the session holding the schema's standby lock."""
    row = db.execute(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objid = 4294967295"
        "   AND l.objsubid = 2"
        "   AND l.classid = (SELECT oid FROM pg_namespace WHERE nspname = %s)"
        "   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        [schema],
    ).fetchone()
    return None if row is None else str(row[0])


def test_a_standby_sweeps_at_once_for_a_stopped_sweeper(
    db_url: str, db: psycopg.Connection
) -> None:
    """The sweeper's process is frozen (SIGSTOP: its session and lock stay);
    a third process crashes: the standby process recovers its messages
    within a couple of seconds (it took up to two sweep intervals, 17.5 s
    measured, at the default 10 s)."""
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(start_consumer(db_url, "idle1"))
        wait_for(lambda: sweeper_holder(db) == sweeper_name(first.proc.pid), 15)
        second = stack.enter_context(start_consumer(db_url, "idle2"))
        wait_for(lambda: standby_holder(db) == sweeper_name(second.proc.pid), 15)
        publish(db_url, "work", 3)
        holder = stack.enter_context(start_consumer(db_url, "work", HOLD="3", PREFETCH="3"))
        assert holder.read_line() == "held 0 1 2"
        os.kill(first.proc.pid, signal.SIGSTOP)
        stack.callback(os.kill, first.proc.pid, signal.SIGCONT)
        wait_for(lambda: process_state(first.proc.pid) == "T")  # stopped
        killed_at = kill(holder)
        wait_for(
            lambda: (
                scalar(
                    db,
                    "SELECT count(*) FROM pgbroker.message"
                    " WHERE queue = 'work' AND state = 'ready'",
                )
                == 3
            ),
            30,
        )
        elapsed = time.monotonic() - killed_at
        assert sweeper_holder(db) == sweeper_name(first.proc.pid)  # still frozen, still the sweeper
    print(f"\nSIGKILL -> requeued by the standby, the sweeper being SIGSTOPped: {elapsed:.2f} s")
    assert elapsed < 3.0, elapsed


EXPIRED_BACKLOG = """
INSERT INTO pgbroker.message (queue, expires_at, exchange, routing_key, headers, properties, body)
SELECT 'expired', now() - interval '1 minute', '', 'expired', '{}', '{}', '\\x00'
FROM generate_series(1, %s)
"""


@pytest.mark.parametrize("backlog", [0, 1_000_000])
def test_recovery_time_does_not_depend_on_expired_messages(
    db_url: str, db: psycopg.Connection, backlog: int
) -> None:
    """A million expired messages are present when a consumer is SIGKILLed:
    its messages are back as fast as without them (recovery is a statement
    of its own), and the expired messages go in batches over the following
    sweeps. (The sweep used to delete them all in the statement that
    recovers, so a large expiry delayed the recovery by as long.)"""
    with Connection(db_url) as conn:
        Consumer(conn, [Queue("idle")], callbacks=[collect([])]).consume()
        drain_quietly(conn, 0.2)
        own = conn.transport._sweeper
        assert own is not None
        wait_for(lambda: own.is_sweeper, 15)
        publish(db_url, "work", 3)
        with start_consumer(db_url, "work", HOLD="3", PREFETCH="3") as holder:
            assert holder.read_line() == "held 0 1 2"
            got: list[Message] = []
            Consumer(conn, [Queue("work")], callbacks=[collect(got)]).consume()
            drain_until(conn, lambda: waits_in_server(db, sweeper_name(os.getpid())), timeout=15)
            if backlog:
                db.execute(EXPIRED_BACKLOG, [backlog])
                db.execute("ANALYZE pgbroker.message")
            killed_at = kill(holder)
            drain_until(conn, lambda: len(got) == 3, timeout=60)
            elapsed = time.monotonic() - killed_at
            left = scalar(db, "SELECT count(*) FROM pgbroker.message WHERE queue = 'expired'")
            if backlog:
                # Housekeeping goes on, a batch at a time, in the sweeps after.
                drain_until(
                    conn,
                    lambda: (
                        scalar(db, "SELECT count(*) FROM pgbroker.message WHERE queue = 'expired'")
                        <= backlog - 10_000
                    ),
                    timeout=30,
                )
    print(f"\nSIGKILL -> redelivered, {backlog:,} expired messages present: {elapsed:.2f} s")
    # (0.1 s without the backlog, 0.25 s with it; 2.75 s when the sweep
    # deleted them all in the statement that recovers.)
    assert elapsed < 1.5, elapsed
    assert left >= backlog // 2  # not all at once
