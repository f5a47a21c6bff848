"""A publish wakes one waiting consumer, not every consumer of the queue.

Every consumer session hears every publish's NOTIFY; before, each idle
consumer of the queue claimed at once and all but one found nothing. Now
the publish names one waiting consumer, at random
(020_waiting_consumers.sql, pgbroker/broker/cursor.py): it claims at once,
the others only ``WAKE_FALLBACK`` seconds later if they still idle. These
tests count the claims, and prove that a named consumer that cannot claim
(stopped, killed, full) does not keep a message from the others for
longer than that.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.asynchronous import Hub

import pgbroker
from pgbroker.broker import consumer, cursor
from pgbroker.broker.transport import Transport
from tests.kombu_helpers import (
    Child,
    connect,
    length_is,
    role_granted_before,
    scalar,
    wait_for,
)


def count_claims(monkeypatch: pytest.MonkeyPatch) -> Counter[int]:
    """Claim statements, by consumer id."""
    claims: Counter[int] = Counter()
    lock = threading.Lock()
    claim = Transport.claim

    def counting(self: Transport, queue: str, limit: int, no_ack: bool, **kw: Any) -> list[Any]:
        with lock:
            claims[self.consumer_id or 0] += 1
        return claim(self, queue, limit, no_ack, **kw)

    monkeypatch.setattr(Transport, "claim", counting)
    return claims


class Consumers:
    """Kombu consumers of one queue, each on its own connection (its own
    session), draining in a thread of its own (with ``loop``, turning a
    Kombu hub, as a Celery worker's consumer does); they record what they
    get (consumer index, body, when) and ack it unless ``ack`` is off,
    after ``work`` seconds in the callback (or the body's ``work``)."""

    def __init__(
        self,
        url: str,
        name: str,
        n: int,
        prefetch: int,
        ack: bool = True,
        loop: bool = False,
        work: float = 0.0,
    ) -> None:
        self.url, self.name, self.prefetch, self.ack, self.loop = url, name, prefetch, ack, loop
        self.work = work
        self.received: list[tuple[int, Any, float]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._consume, args=(i,)) for i in range(n)]

    def _consume(self, index: int) -> None:
        def on_message(body: Any, message: Any) -> None:
            with self._lock:
                self.received.append((index, body, time.monotonic()))
            time.sleep(body.get("work", self.work) if isinstance(body, dict) else self.work)
            if self.ack:
                message.ack()

        hub = Hub() if self.loop else None
        try:
            with connect(self.url, sweep_interval=30) as conn:
                channel = conn.channel()
                channel.basic_qos(0, self.prefetch, False)
                if hub is not None:
                    conn.register_with_event_loop(hub)
                with Consumer(channel, [Queue(self.name)], callbacks=[on_message]):
                    while not self._stop.is_set():
                        if hub is not None:
                            hub.run_once()  # at most LOOP_WAKE_INTERVAL
                            continue
                        with contextlib.suppress(TimeoutError):
                            conn.drain_events(timeout=0.2)
        finally:
            if hub is not None:
                hub.close()  # its poller and waker sockets

    def __enter__(self) -> Consumers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)


def waiting(url: str, queue: str) -> int:
    """Consumers of ``queue`` that wait for a wake-up."""
    with psycopg.connect(url) as db:
        return int(
            scalar(
                db,
                "SELECT count(*) FROM pgbroker.consumer_queue"
                " WHERE queue = %s AND waiting_since IS NOT NULL",
                queue,
            )
        )


@contextlib.contextmanager
def producer_for(url: str, name: str) -> Iterator[Producer]:
    with Connection(url) as conn:
        Queue(name)(conn.default_channel).declare()
        yield Producer(conn.default_channel, routing_key=name)


def test_a_publish_wakes_one_idle_consumer_not_all(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight idle consumers, thirty publishes one after the other: about
    one claim per publish (240 before: every consumer claimed at each);
    each message goes to exactly one consumer, and they spread over the
    consumers (each names one at random)."""
    claims = count_claims(monkeypatch)
    n, m = 8, 30
    with producer_for(db_url, "wake-one") as producer, Consumers(db_url, "wake-one", n, 4) as group:
        wait_for(lambda: waiting(db_url, "wake-one") == n)
        claims.clear()
        for i in range(m):
            producer.publish({"i": i})
            wait_for(length_is(group.received, i + 1), timeout=5, interval=0.002)
        made = sum(claims.values())
    assert sorted(body["i"] for _, body, _ in group.received) == list(range(m))
    # Each named consumer's claim, and at most one fallback claim for each
    # of the others if the publishes outlast WAKE_FALLBACK on a slow machine.
    assert made <= m + 2 * n, claims
    assert len({index for index, _, _ in group.received}) >= n // 2


class Places:
    """The places that publishes NOTIFY on the schema's channel, heard by a
    session of the test: which consumer each one names."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute("LISTEN pgbroker")

    def named(self, queue: str, count: int) -> list[int | None]:
        """The consumers named by the next ``count`` places of ``queue``
        (None: a place that names nobody)."""
        found: list[int | None] = []
        deadline = time.monotonic() + 10
        while len(found) < count:
            assert time.monotonic() < deadline, found
            for notify in self.conn.notifies(timeout=0.5):
                name, newline, place = notify.payload.rpartition("\n")
                if newline and name == queue:
                    numbers = place.split(" ")
                    found.append(int(numbers[2]) if len(numbers) == 3 else None)
                    if len(found) == count:
                        break
        return found

    def close(self) -> None:
        self.conn.close()


CHILD_CONSUMER = """
import os, sys, time
from kombu import Connection, Consumer, Queue
def on_message(body, message):
    print("got", body["i"], flush=True)
    message.ack()
with Connection(os.environ["TEST_URL"], transport_options={"sweep_interval": 30}) as conn:
    with Consumer(conn, [Queue("wake-stopped")], callbacks=[on_message]):
        print("consuming", conn.transport.consumer_id, flush=True)
        while True:
            try:
                conn.drain_events(timeout=1)
            except TimeoutError:
                pass
"""


@pytest.mark.parametrize("loop", [False, True], ids=["drain_events", "event_loop"])
def test_a_stopped_named_consumer_leaves_the_message_to_the_others(db_url: str, loop: bool) -> None:
    """A waiting consumer is stopped (SIGSTOP): publishes that name it are
    taken by the other consumer after WAKE_FALLBACK, once; those that name
    the other are taken at once. The other waits in ``drain_events``, or
    in an event loop (its fallback is a timer of the loop)."""
    places = Places(db_url)
    with producer_for(db_url, "wake-stopped") as producer, Child(CHILD_CONSUMER, db_url) as named:
        word, consumer_id = named.read_line().split()
        assert word == "consuming"
        with Consumers(db_url, "wake-stopped", 1, 4, loop=loop) as other:
            wait_for(lambda: waiting(db_url, "wake-stopped") == 2)
            os.kill(named.proc.pid, signal.SIGSTOP)
            delays: dict[bool, float] = {}
            # Each publish names one of the two at random: until each was named.
            for i in range(40):
                if len(delays) == 2:
                    break
                published = time.monotonic()
                producer.publish({"i": i})
                (who,) = places.named("wake-stopped", 1)
                wait_for(length_is(other.received, i + 1), timeout=cursor.WAKE_FALLBACK + 5)
                delays.setdefault(who == int(consumer_id), other.received[i][2] - published)
            os.kill(named.proc.pid, signal.SIGCONT)
            time.sleep(0.5)
            assert named.lines.empty()  # all acked by the other: none delivered again
    places.close()
    assert set(delays) == {True, False}, delays  # each was named
    assert delays[False] < cursor.WAKE_FALLBACK * 0.5, delays  # the other, named
    assert cursor.WAKE_FALLBACK * 0.8 <= delays[True] < cursor.WAKE_FALLBACK + 3, delays
    assert [body["i"] for _, body, _ in other.received] == list(range(len(other.received)))


def test_a_killed_consumer_does_not_keep_messages_from_the_others(db_url: str) -> None:
    """A waiting consumer is killed (SIGKILL): until a sweep removes it, a
    publish may still name it; the other consumer takes the message within
    WAKE_FALLBACK either way."""
    with producer_for(db_url, "wake-stopped") as producer, Child(CHILD_CONSUMER, db_url) as named:
        assert named.read_line().startswith("consuming")
        with Consumers(db_url, "wake-stopped", 1, 4) as other:
            wait_for(lambda: waiting(db_url, "wake-stopped") == 2)
            os.kill(named.proc.pid, signal.SIGKILL)
            for i in range(3):
                published = time.monotonic()
                producer.publish({"i": i})
                wait_for(length_is(other.received, i + 1), timeout=cursor.WAKE_FALLBACK + 5)
                assert other.received[i][2] - published < cursor.WAKE_FALLBACK + 1
    assert [body["i"] for _, body, _ in other.received] == [0, 1, 2]


def test_a_named_consumer_with_no_room_passes_the_wake_up_on(db_url: str) -> None:
    """Four messages committed together, each naming one of four waiting
    consumers with a prefetch of 1. A consumer named more than once takes
    one and passes the rest on at once: the consumers no message named
    have theirs well before WAKE_FALLBACK. (Repeated until a commit names
    fewer than four consumers; all four differ one time in ten.)"""
    places = Places(db_url)
    for attempt in range(10):
        name = f"wake-full-{attempt}"
        with (
            producer_for(db_url, name) as producer,
            Consumers(db_url, name, 4, 1, ack=False) as group,
            psycopg.connect(db_url) as db,
        ):
            wait_for(lambda: waiting(db_url, name) == 4)  # noqa: B023
            with db.transaction(), pgbroker.enqueue_in(db):
                for i in range(4):
                    producer.publish({"i": i})
            committed = time.monotonic()
            named = places.named(name, 4)
            wait_for(length_is(group.received, 4), timeout=cursor.WAKE_FALLBACK + 5)
            last = max(at for _, _, at in group.received) - committed
        assert sorted(body["i"] for _, body, _ in group.received) == [0, 1, 2, 3]
        assert len({index for index, _, _ in group.received}) == 4
        if len(set(named)) < 4:
            break
    places.close()
    assert len(set(named)) < 4, named
    assert last < cursor.WAKE_FALLBACK * 0.5, (last, named)


def consumer_queue_updates(url: str) -> int:
    """Updates of consumer_queue rows so far, once every other session of
    the database has ended (a session's statistics reach the server at its
    end at the latest)."""
    with psycopg.connect(url, autocommit=True) as db:
        others = (
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        wait_for(lambda: scalar(db, others) == 0)
        return int(
            scalar(db, "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'consumer_queue'")
        )


@pytest.mark.parametrize("work", [0.0, consumer.BLOCKING_DELIVERY * 1.2], ids=["fast", "blocking"])
def test_a_consumer_busy_and_idle_at_every_message_writes_its_waiting_seldom(
    db_url: str, work: float
) -> None:
    """Two consumers with a prefetch of 1: each claim that takes a message
    fills the window (not waiting), the next one finds nothing (waiting).
    Written at every claim, that was two row versions of consumer_queue per
    message, which a transaction pinning the xmin horizon keeps for every
    publish's lookup of a waiting consumer to step over (the longtx figures
    of docs/benchmarks.md). Changes are written at most once per
    WAITING_WRITE_EVERY per consumer; the messages still arrive at once. A
    consumer that runs the work in its callback (``blocking``) stops
    waiting for good: one write after its first wait."""
    before = consumer_queue_updates(db_url)
    m = 20 if work else 60
    name = f"wake-churn-{'blocking' if work else 'fast'}"
    with (
        producer_for(db_url, name) as producer,
        Consumers(db_url, name, 2, 1, work=work) as group,
    ):
        wait_for(lambda: waiting(db_url, name) == 2)
        started = time.monotonic()
        for i in range(m):
            producer.publish({"i": i})
            wait_for(length_is(group.received, i + 1), timeout=5, interval=0.002)
            time.sleep(0.01)
        elapsed = time.monotonic() - started
    assert sorted(body["i"] for _, body, _ in group.received) == list(range(m))
    updates = consumer_queue_updates(db_url) - before
    if work:
        assert updates <= 2 * 2, updates  # each: its first wait, then not waiting
    else:
        # Each consumer: its first wait, then a change per WAITING_WRITE_EVERY.
        assert updates <= 2 * (2 + elapsed / consumer.WAITING_WRITE_EVERY), (updates, elapsed)


def test_a_consumer_that_ran_the_work_once_waits_again_later(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One slow callback (or one long gap between drain_events calls: a
    pause, a GC) marks a consumer as running the work itself, which does not
    wait for a wake-up (every publish that names nobody wakes it). Once it
    has run no work for BLOCKING_MEMORY seconds it waits again, to be woken
    alone. The mark used to last the rest of the session: 64 consumers
    paused once were all woken by every publish, and under a long
    transaction their claims cost the server two to three times as much
    (docs/benchmarks.md, 2026-12-08)."""
    monkeypatch.setattr(consumer, "BLOCKING_MEMORY", 1.0)
    name = "wake-blocked-once"
    with producer_for(db_url, name) as producer, Consumers(db_url, name, 1, 4) as group:
        wait_for(lambda: waiting(db_url, name) == 1)
        producer.publish({"i": 0, "work": consumer.BLOCKING_DELIVERY * 1.5})
        sent = 1

        def publish_until(done: Any) -> None:
            nonlocal sent
            deadline = time.monotonic() + 10
            while not done():
                assert time.monotonic() < deadline, "the waiting state never changed"
                producer.publish({"i": sent})
                sent += 1
                wait_for(length_is(group.received, sent), timeout=5, interval=0.002)
                time.sleep(0.1)

        publish_until(lambda: waiting(db_url, name) == 0)  # runs the work: not waiting
        publish_until(lambda: waiting(db_url, name) == 1)  # BLOCKING_MEMORY later: waits
    assert sorted(body["i"] for _, body, _ in group.received) == list(range(sent))


def test_a_publish_sends_one_notification_per_queue(db_url: str) -> None:
    """A publish sends its first message's place in each queue it reaches,
    and nothing else: a queue's name means a message made ready again, on
    which every consumer of the queue claims the whole queue at once (until
    2026-12-07 the name went before the place, and the consumer had to pair
    them). Through a fanout exchange to two queues, its route resolved in
    SQL and then from the cache, and through the default exchange."""
    with psycopg.connect(db_url, autocommit=True) as heard, Connection(db_url) as conn:
        channel = conn.default_channel
        fanout = Exchange("one-note", "fanout")
        for name in ("one-note-a", "one-note-b"):
            Queue(name, fanout)(channel).declare()
        heard.execute("LISTEN pgbroker")
        producer = Producer(channel)
        producer.publish({"i": 1}, exchange=fanout)  # routed in SQL
        producer.publish({"i": 2}, exchange=fanout)  # from the cache
        producer.publish({"i": 3}, routing_key="one-note-a")
        notes = [n.payload for n in heard.notifies(timeout=1)]
        rows = heard.execute("SELECT queue, id FROM pgbroker.message ORDER BY id").fetchall()
    assert [q for q, _ in rows].count("one-note-a") == 3 and len(rows) == 5
    assert sorted(notes) == sorted(f"{q}\n0 {i}" for q, i in rows)


def test_a_role_granted_before_the_waiting_consumers_still_publishes(db_url: str) -> None:
    """An application role granted the tables before migration 020 (the
    grant does not cover the view created later) publishes, and its
    publish still names the waiting consumer."""
    with role_granted_before(db_url, "pgb_old_wake_", "waiting_consumer") as role:
        parts = urlsplit(db_url)
        app_url = urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rpartition('@')[2]}"))
        with (
            producer_for(db_url, "wake-granted"),
            Consumers(db_url, "wake-granted", 2, 4) as group,
            Connection(app_url) as app,
        ):
            wait_for(lambda: waiting(db_url, "wake-granted") == 2)
            Producer(app.default_channel, routing_key="wake-granted").publish({"i": 1})
            wait_for(lambda: group.received, timeout=cursor.WAKE_FALLBACK * 0.5)


def test_the_publish_finds_the_waiting_consumer_through_the_queue_index(db_url: str) -> None:
    """waiting_consumer picks one row per queue (DISTINCT ON): read with the
    queue given, as the publish reads it, the condition must reach the
    scan of consumer_queue_queue, not come after a sort of every queue's
    consumers."""
    with psycopg.connect(db_url) as db:
        db.execute(
            "PREPARE lookup(text) AS SELECT (SELECT consumer_id FROM pgbroker.waiting_consumer"
            " WHERE queue = $1)"
        )
        db.execute("SET plan_cache_mode = force_generic_plan")
        plan = "\n".join(row[0] for row in db.execute("EXPLAIN EXECUTE lookup('q')"))
    assert "Index Cond: (queue = $1)" in plan, plan
    assert "Seq Scan on consumer_queue" not in plan, plan
