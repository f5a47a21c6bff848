"""Crash recovery: a dead consumer's messages come back within a few sweep
intervals, a live one never loses them, and a stale ack cannot remove a
message that another consumer now holds."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import psycopg
import pytest
from kombu import Consumer, Message, Producer, Queue

from tests.kombu_helpers import Child, collect, connect, drain_quietly, drain_until, rows, scalar

# A consumer that takes PREFETCH messages, reports them and then holds them
# without acking (a worker busy with long tasks), until it is killed.
HOLDING_CONSUMER = """
import os, time
from kombu import Connection, Consumer, Queue
prefetch = int(os.environ["PREFETCH"])
got = []
conn = Connection(os.environ["TEST_URL"], transport_options={"sweep_interval": 0.3})
with Consumer(conn, [Queue("work")], callbacks=[lambda body, m: got.append(body)],
              prefetch_count=prefetch):
    while len(got) < prefetch:
        try:
            conn.drain_events(timeout=1)
        except TimeoutError:
            pass
    print(conn.transport.consumer_id, *sorted(got), flush=True)
    time.sleep(120)
"""


def publish(url: str, n: int) -> None:
    with connect(url) as conn:
        producer = Producer(conn.default_channel)
        for i in range(n):
            producer.publish(i, routing_key="work", declare=[Queue("work")])


def reserved_by(db: psycopg.Connection) -> dict[int, int]:
    return dict(
        rows(
            db,
            "SELECT consumer_id, count(*) FROM pgbroker.message"
            " WHERE state = 'reserved' GROUP BY consumer_id",
        )
    )


def test_sigkilled_consumer_messages_are_redelivered(db_url: str, db: psycopg.Connection) -> None:
    publish(db_url, 5)
    with Child(HOLDING_CONSUMER, db_url, PREFETCH="3") as child:
        consumer_id, *held = (int(x) for x in child.read_line().split())
        assert held == [0, 1, 2]
        assert reserved_by(db) == {consumer_id: 3}
        os.kill(child.proc.pid, signal.SIGKILL)
        child.proc.wait(timeout=10)
        killed_at = time.monotonic()

        with connect(db_url, sweep_interval=0.2) as conn:
            got: list[Message] = []

            def on_message(body: Any, message: Message) -> None:
                got.append(message)
                message.ack()

            with Consumer(conn, [Queue("work")], callbacks=[on_message]):
                drain_until(conn, lambda: len(got) == 5, timeout=10)
                elapsed = time.monotonic() - killed_at
                drain_quietly(conn, 0.5)
    assert elapsed < 5, elapsed
    redelivered = {m.payload: m.delivery_info["redelivered"] for m in got}
    assert redelivered == {0: True, 1: True, 2: True, 3: False, 4: False}
    assert (
        sorted(
            rows(db, "SELECT reason, queue, consumer_id, delivery_count FROM pgbroker.redelivery")
        )
        == [("consumer died", "work", consumer_id, 1)] * 3
    )
    assert scalar(db, "SELECT count(*) FROM pgbroker.message") == 0
    assert scalar(db, "SELECT count(*) FROM pgbroker.consumer") == 0


def test_terminated_session_and_fenced_ack(db_url: str, db: psycopg.Connection) -> None:
    publish(db_url, 3)
    a = connect(db_url)
    try:
        held: list[Message] = []
        Consumer(a, [Queue("work")], callbacks=[collect(held)], prefetch_count=2).consume()
        drain_until(a, lambda: len(held) == 2)
        a_id = a.transport.consumer_id
        assert reserved_by(db) == {a_id: 2}
        a_pid = a.transport._conn.info.backend_pid
        assert scalar(db, "SELECT pg_terminate_backend(%s)", a_pid) is True
        terminated_at = time.monotonic()

        with connect(db_url, sweep_interval=0.2) as b:
            got: list[Message] = []
            with Consumer(b, [Queue("work")], callbacks=[collect(got)]):
                drain_until(b, lambda: len(got) == 3, timeout=10)
                assert time.monotonic() - terminated_at < 5
                b_id = b.transport.consumer_id
                assert reserved_by(db) == {b_id: 3}
                assert sorted(m.payload for m in got if m.delivery_info["redelivered"]) == [0, 1]
                assert scalar(db, "SELECT count(*) FROM pgbroker.redelivery") == 2

                # A's session is gone: its ack fails with a connection error...
                with pytest.raises(a.connection_errors):
                    held[0].ack()
                # ...and after reconnecting, A's stale ack of the same delivery
                # tag (the message id) leaves B's message alone.
                with connect(db_url) as a2:
                    tag = held[0].delivery_tag
                    a2.default_channel.basic_ack(tag)  # no consumer yet: nothing
                    Consumer(a2, [Queue("other")], callbacks=[collect([])]).consume()
                    assert a2.transport.consumer_id not in (None, a_id, b_id)
                    a2.default_channel.basic_ack(tag)
                    a2.transport.requeue([tag])
                    a2.transport.dead_letter([tag])
                    # The fence holds for the old consumer id too.
                    assert a2.transport.run_count("ack", ids=[tag], consumer_id=a_id) == 0
                    assert reserved_by(db) == {b_id: 3}
                    assert scalar(db, "SELECT count(*) FROM pgbroker.dead_letter") == 0
                for m in got:
                    m.ack()
                assert scalar(db, "SELECT count(*) FROM pgbroker.message") == 0
    finally:
        a.close()


def test_live_slow_consumer_keeps_its_messages(db_url: str, db: psycopg.Connection) -> None:
    publish(db_url, 2)
    with Child(HOLDING_CONSUMER, db_url, PREFETCH="2") as child:
        consumer_id, *held = (int(x) for x in child.read_line().split())
        assert held == [0, 1]
        # The periodic sweep itself, which fast recovery's sweeper thread
        # would stand in for (tests/test_sweeper.py covers that path).
        with connect(db_url, sweep_interval=0.2, fast_recovery=False) as conn:
            sweeps: list[tuple[int, int, int]] = []
            sweep = conn.transport.sweep

            def counted_sweep() -> tuple[int, int, int]:
                sweeps.append(sweep())
                return sweeps[-1]

            conn.transport.sweep = counted_sweep
            got: list[Message] = []
            with Consumer(conn, [Queue("work")], callbacks=[collect(got)]):
                drain_quietly(conn, 2.0)
        assert len(sweeps) >= 5, sweeps  # many sweeps ran while the worker was busy
        assert all(s[0] == 0 for s in sweeps), sweeps
        assert got == []
        assert reserved_by(db) == {consumer_id: 2}
        assert scalar(db, "SELECT count(*) FROM pgbroker.redelivery") == 0
        assert child.proc.poll() is None


def test_clean_close_requeues_at_once_without_redelivery_log(
    db_url: str, db: psycopg.Connection
) -> None:
    publish(db_url, 2)
    with connect(db_url, sweep_interval=60) as a:
        held: list[Message] = []
        with Consumer(a, [Queue("work")], callbacks=[collect(held)]):
            drain_until(a, lambda: len(held) == 2)
    assert rows(db, "SELECT state, consumer_id FROM pgbroker.message") == [("ready", None)] * 2
    assert scalar(db, "SELECT count(*) FROM pgbroker.consumer") == 0
    # No sweep needed: another consumer gets them at once.
    with connect(db_url, sweep_interval=60) as b:
        q = b.SimpleQueue("work")
        m = q.get(timeout=2)
        assert m.delivery_info["redelivered"] is True
        m.ack()
        q.close()
