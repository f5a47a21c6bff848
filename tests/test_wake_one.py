"""A publish wakes one waiting consumer, not every consumer of the queue.

Every consumer session hears every publish's NOTIFY; before, each idle
consumer of the queue claimed at once and all but one found nothing. Now
the publish names the consumer that has waited longest
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

import psycopg
import pytest
from kombu import Connection, Consumer, Producer, Queue

import pgbroker
from pgbroker.broker import cursor
from pgbroker.broker.transport import Transport
from tests.kombu_helpers import Child, connect, length_is, scalar, wait_for


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
    session), draining in a thread of its own; they record what they get
    (consumer index, body, when) and ack it unless ``ack`` is off."""

    def __init__(self, url: str, name: str, n: int, prefetch: int, ack: bool = True) -> None:
        self.url, self.name, self.prefetch, self.ack = url, name, prefetch, ack
        self.received: list[tuple[int, Any, float]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._consume, args=(i,)) for i in range(n)]

    def _consume(self, index: int) -> None:
        def on_message(body: Any, message: Any) -> None:
            with self._lock:
                self.received.append((index, body, time.monotonic()))
            if self.ack:
                message.ack()

        with connect(self.url, sweep_interval=30) as conn:
            channel = conn.channel()
            channel.basic_qos(0, self.prefetch, False)
            with Consumer(channel, [Queue(self.name)], callbacks=[on_message]):
                while not self._stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        conn.drain_events(timeout=0.2)

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
    one claim per publish (240 before: every consumer claimed at each),
    and the publishes go round the consumers (the one waiting longest
    first), each message to exactly one."""
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
    assert {index for index, _, _ in group.received} == set(range(n))


CHILD_CONSUMER = """
import os, sys, time
from kombu import Connection, Consumer, Queue
def on_message(body, message):
    print("got", body["i"], flush=True)
    message.ack()
with Connection(os.environ["TEST_URL"], transport_options={"sweep_interval": 30}) as conn:
    with Consumer(conn, [Queue("wake-stopped")], callbacks=[on_message]):
        print("consuming", flush=True)
        while True:
            try:
                conn.drain_events(timeout=1)
            except TimeoutError:
                pass
"""


@pytest.mark.parametrize("how", ["SIGSTOP", "SIGKILL"])
def test_a_named_consumer_that_cannot_claim_leaves_the_message_to_the_others(
    db_url: str, how: str
) -> None:
    """The consumer waiting longest is stopped (or killed, before any sweep
    has removed it): the publish names it, and another consumer takes the
    message after WAKE_FALLBACK, once."""
    with producer_for(db_url, "wake-stopped") as producer, Child(CHILD_CONSUMER, db_url) as named:
        assert named.read_line() == "consuming"
        wait_for(lambda: waiting(db_url, "wake-stopped") == 1)
        with Consumers(db_url, "wake-stopped", 1, 4) as other:
            wait_for(lambda: waiting(db_url, "wake-stopped") == 2)
            os.kill(named.proc.pid, getattr(signal, how))
            published = time.monotonic()
            producer.publish({"i": 1})
            wait_for(lambda: other.received, timeout=cursor.WAKE_FALLBACK + 5)
            taken = other.received[0][2] - published
            if how == "SIGSTOP":
                # It was named, not the other (which waited for its fallback).
                assert taken >= cursor.WAKE_FALLBACK * 0.8, taken
                os.kill(named.proc.pid, signal.SIGCONT)
                time.sleep(0.5)
                assert named.lines.empty()  # acked by the other: not delivered again
    assert [body for _, body, _ in other.received] == [{"i": 1}]


def test_a_named_consumer_with_no_room_passes_the_wake_up_on(db_url: str) -> None:
    """Four messages committed together all name the same consumer (the
    one waiting longest when each was stored). With a prefetch of 1 it
    takes one and passes the rest on at once: the other three consumers
    have theirs well before WAKE_FALLBACK."""
    with (
        producer_for(db_url, "wake-full") as producer,
        Consumers(db_url, "wake-full", 4, 1, ack=False) as group,
        psycopg.connect(db_url) as db,
    ):
        wait_for(lambda: waiting(db_url, "wake-full") == 4)
        with db.transaction(), pgbroker.enqueue_in(db):
            for i in range(4):
                producer.publish({"i": i})
        committed = time.monotonic()
        wait_for(lambda: len(group.received) == 4, timeout=cursor.WAKE_FALLBACK + 5)
        last = max(at for _, _, at in group.received) - committed
    assert sorted(body["i"] for _, body, _ in group.received) == [0, 1, 2, 3]
    assert len({index for index, _, _ in group.received}) == 4
    assert last < cursor.WAKE_FALLBACK * 0.5, last
