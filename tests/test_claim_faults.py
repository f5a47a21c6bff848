"""Fault injection on the claim and ack pipeline (docs/delivery.md, "When a
claim or an ack fails").

A claim hands its rows over before its commit's reply is read, and acks ride
on claims. These tests make commits fail (a deferred constraint trigger that
raises) and end the consumer's backend (pg_terminate_backend) at each point
of the pipeline, with consumers that reconnect as Celery's does (a new
connection), and count: no message acknowledged by the application is
delivered again, no message is delivered to two consumers at once, nothing
is lost.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from kombu import Connection, Consumer, Exchange, Message, Producer, Queue
from kombu.asynchronous import Hub

from pgbroker.broker.transport import Transport
from tests import pgserver

EXCHANGE = Exchange("faults", "direct")
QUEUES = [Queue("faults_a", EXCHANGE, "a"), Queue("faults_b", EXCHANGE, "b")]
N = 40  # per queue


class Ledger:
    """What the application saw, checked as it happens."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[str, str] = {}  # message -> consumer running it
        self.acked: set[str] = set()
        self.deliveries = 0
        self.violations: list[str] = []

    def deliver(self, who: str, key: str) -> None:
        with self.lock:
            self.deliveries += 1
            if key in self.acked:
                self.violations.append(f"{key} delivered to {who} after the app acked it")
            if key in self.running and self.running[key] != who:
                self.violations.append(
                    f"{key} delivered to {who} while {self.running[key]} runs it"
                )
            self.running[key] = who

    def ack(self, who: str, key: str) -> None:
        with self.lock:
            self.acked.add(key)
            if self.running.get(key) == who:
                del self.running[key]

    def done(self) -> bool:
        with self.lock:
            return len(self.acked) == N * len(QUEUES)


def publish(url: str) -> None:
    with Connection(url) as conn:
        producer = Producer(conn.channel())
        for i in range(N):
            for q in QUEUES:
                producer.publish(
                    {"key": f"{q.name}-{i}"},
                    exchange=q.exchange,
                    routing_key=q.routing_key,
                    declare=[q],
                )


def consume(
    url: str,
    who: str,
    ledger: Ledger,
    stop: threading.Event,
    errors: list[BaseException],
    in_callback: Callable[[Connection], None] | None = None,
    event_loop: bool = False,
) -> None:
    """Consume both queues until stopped; on any error start over with a new
    connection, as Celery's worker does. With ``event_loop``, in a Kombu
    event loop as Celery's worker does (acks then ride on the next claim)."""
    while not stop.is_set():
        conn = Connection(url, transport_options={"sweep_interval": 0.3})
        try:
            with conn:

                def on_message(body: Any, message: Message, conn: Connection = conn) -> None:
                    ledger.deliver(who, body["key"])
                    if in_callback is not None:
                        in_callback(conn)
                    message.ack()
                    ledger.ack(who, body["key"])

                # Event loop: one message per claim, each claim carrying
                # the ack of the message before.
                prefetch = 1 if event_loop else 5
                with Consumer(conn, QUEUES, callbacks=[on_message], prefetch_count=prefetch):
                    if event_loop:
                        hub = Hub()
                        try:
                            conn.register_with_event_loop(hub)
                            while not stop.is_set():
                                hub.run_once()
                        finally:
                            hub.close()
                    while not stop.is_set():
                        with contextlib.suppress(TimeoutError):
                            conn.drain_events(timeout=0.3)
        except Exception as exc:
            errors.append(exc)
            time.sleep(0.05)


def check(ledger: Ledger, db: psycopg.Connection) -> None:
    assert ledger.violations == []
    assert len(ledger.acked) == N * len(QUEUES)  # nothing lost
    # Every ack was written: the table is empty (acks of a lost session are
    # written by the next one before it claims).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if db.execute("SELECT count(*) FROM pgbroker.message").fetchone() == (0,):
            break
        time.sleep(0.1)
    assert db.execute("SELECT count(*) FROM pgbroker.message").fetchone() == (0,)


def test_failing_commits_keep_acks_and_hand_out_nothing(
    db_url: str, db: psycopg.Connection
) -> None:
    """A deferred constraint trigger makes every third claim or ack of one
    consumer fail, while a second consumer claims from the same queues."""
    db.execute("CREATE SEQUENCE fault_seq")
    db.execute(
        """CREATE FUNCTION fail_some() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF current_setting('application_name') = 'faulty'
               AND nextval('fault_seq') % 3 = 0 THEN
                RAISE EXCEPTION 'injected commit failure';
            END IF;
            RETURN NULL;
        END $$"""
    )
    db.execute(
        "CREATE CONSTRAINT TRIGGER fail_some AFTER UPDATE OR DELETE ON pgbroker.message "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_some()"
    )
    faulty = db_url + ("&" if "?" in db_url else "?") + "application_name=faulty"
    ledger = Ledger()
    publish(db_url)
    stop = threading.Event()
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=consume, args=(faulty, "faulty", ledger, stop, errors)),
        threading.Thread(target=consume, args=(db_url, "healthy", ledger, stop, errors)),
    ]
    # The faulty one first, until its first delivery: on a loaded machine
    # the healthy one, started with it, could otherwise take every message.
    threads[0].start()
    started = time.monotonic()
    while not ledger.deliveries and not errors and time.monotonic() - started < 30:
        time.sleep(0.01)
    threads[1].start()
    deadline = time.monotonic() + 60
    try:
        while not ledger.done() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # on purpose: a delivery after its ack would show by now
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    injected = [e for e in errors if "injected commit failure" in str(e)]
    assert injected, errors  # the fault did happen
    check(ledger, db)


class Killer:
    """Ends the consumer's own backend at one point of the pipeline, every
    ``every``-th time it is reached."""

    def __init__(self, admin_url: str, every: int) -> None:
        self.admin = psycopg.connect(admin_url, autocommit=True)
        self.every = every
        self.reached = 0
        self.kills = 0
        self.lock = threading.Lock()

    def maybe_kill(self, transport: Transport) -> None:
        with self.lock:
            self.reached += 1
            if self.reached % self.every or transport._conn is None:
                return
            self.kills += 1
            pid = transport._conn.info.backend_pid
        self.admin.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])


POINTS = [
    "before claim",
    "claim, before its commit reply",
    "after delivery, before ack",
    "ack, before its commit",
    "event loop: claim carrying acks, before its commit reply",
]


@pytest.mark.parametrize("point", POINTS)
def test_terminated_backend_loses_no_ack(
    point: str, db_url: str, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    killer = Killer(pgserver.libpq_url(db_url), every=4)
    in_callback: Callable[[Connection], None] | None = None
    if point == "before claim":
        claim = Transport.claim

        def killing_claim(self: Transport, *args: Any, **kwargs: Any) -> Any:
            if not args[2]:  # not the no-ack claims of pidbox-like queues
                killer.maybe_kill(self)
            return claim(self, *args, **kwargs)

        monkeypatch.setattr(Transport, "claim", killing_claim)
    elif point.endswith("claim, before its commit reply"):
        pipelined = Transport._run_pipelined
        riding_only = point.startswith("event loop")

        def killing_pipelined(self: Transport, query: str, params: dict[str, Any]) -> Any:
            rows = pipelined(self, query, params)
            if params.get("acks") or not riding_only:
                killer.maybe_kill(self)
            return rows

        monkeypatch.setattr(Transport, "_run_pipelined", killing_pipelined)
    elif point == "after delivery, before ack":
        in_callback = lambda conn: killer.maybe_kill(conn.transport)  # noqa: E731
    else:
        run_count = Transport.run_count

        def killing_run_count(self: Transport, query: str, /, **params: Any) -> Any:
            if query == "ack":
                killer.maybe_kill(self)
            return run_count(self, query, **params)

        monkeypatch.setattr(Transport, "run_count", killing_run_count)
    ledger = Ledger()
    publish(db_url)
    stop = threading.Event()
    errors: list[BaseException] = []
    thread = threading.Thread(
        target=consume,
        args=(db_url, "consumer", ledger, stop, errors, in_callback, point.startswith("event")),
    )
    thread.start()
    deadline = time.monotonic() + 60
    try:
        while not ledger.done() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # on purpose: a delivery after its ack would show by now
    finally:
        stop.set()
        thread.join(10)
        killer.admin.close()
    assert killer.kills >= 2, (killer.reached, errors)
    check(ledger, db)
