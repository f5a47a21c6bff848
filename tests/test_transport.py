"""Kombu channel semantics: prefetch, acks, rejects, purge, size, delete,
priorities, names, many messages, and idle behaviour."""

from __future__ import annotations

import contextlib
import threading
import time
from queue import Empty
from typing import Any

import psycopg
import pytest
from kombu import Connection, Consumer, Exchange, Message, Producer, Queue

from tests import pgserver
from tests.kombu_helpers import (
    Child,
    collect,
    connect,
    drain_more,
    drain_quietly,
    drain_until,
    rows,
    scalar,
)


def states(db: psycopg.Connection) -> dict[str, int]:
    return dict(rows(db, "SELECT state, count(*) FROM pgbroker.message GROUP BY state"))


def publish_n(conn: Connection, queue: Queue, n: int, **kwargs: Any) -> None:
    producer = Producer(conn.default_channel)
    for i in range(n):
        producer.publish({"i": i}, routing_key=queue.name, declare=[queue], **kwargs)


def ack_all(messages: list[Message]) -> None:
    for m in messages:
        if not m.acknowledged:
            m.ack()


def test_prefetch_limits_each_claim_and_acks_free_capacity(
    db_url: str, db: psycopg.Connection
) -> None:
    queue = Queue("pf")
    with connect(db_url) as conn:
        publish_n(conn, queue, 10)
        got: list[Message] = []
        with Consumer(conn, [queue], callbacks=[collect(got)], prefetch_count=3):
            conn.drain_events(timeout=5)
            # One claim took exactly the prefetch count, no more.
            assert len(got) == 3
            assert states(db) == {"reserved": 3, "ready": 7}
            drain_quietly(conn, 0.5)
            assert len(got) == 3
            got[0].ack()
            got[1].ack()
            conn.drain_events(timeout=5)
            assert len(got) == 5
            assert states(db) == {"reserved": 3, "ready": 5}
            while len(got) < 10:
                ack_all(got)
                drain_more(conn, got)
                assert (
                    scalar(db, "SELECT count(*) FROM pgbroker.message WHERE state = 'reserved'")
                    <= 3
                )
            ack_all(got)
        assert [m.payload["i"] for m in got] == list(range(10))
    assert states(db) == {}


def test_ack_deletes_the_row(db_url: str, db: psycopg.Connection) -> None:
    queue = Queue("acked")
    with connect(db_url) as conn:
        publish_n(conn, queue, 1)
        got: list[Message] = []
        with Consumer(conn, [queue], callbacks=[collect(got)]):
            drain_until(conn, lambda: len(got) == 1)
            assert states(db) == {"reserved": 1}
            got[0].ack()
            assert states(db) == {}
            assert got[0].delivery_info["redelivered"] is False


def test_reject_without_requeue_dead_letters(db_url: str, db: psycopg.Connection) -> None:
    queue = Queue("rej")
    with connect(db_url) as conn:
        Producer(conn.default_channel).publish(
            {"bad": 1}, routing_key="rej", declare=[queue], headers={"id": "t-9"}
        )
        got: list[Message] = []
        with Consumer(conn, [queue], callbacks=[collect(got)]):
            drain_until(conn, lambda: len(got) == 1)
            got[0].reject()
            drain_quietly(conn, 0.3)
            assert len(got) == 1
    assert states(db) == {}
    assert rows(db, "SELECT reason, queue, task_id, delivery_count FROM pgbroker.dead_letter") == [
        ("rejected", "rej", "t-9", 1)
    ]


def test_reject_with_requeue_redelivers(db_url: str, db: psycopg.Connection) -> None:
    queue = Queue("requeue")
    with connect(db_url) as conn:
        publish_n(conn, queue, 2)
        got: list[Message] = []
        with Consumer(conn, [queue], callbacks=[collect(got)], prefetch_count=1):
            drain_until(conn, lambda: len(got) == 1)
            assert got[0].payload == {"i": 0}
            got[0].requeue()
            # It goes back to its place at the head of the queue.
            drain_until(conn, lambda: len(got) == 2)
            assert got[1].payload == {"i": 0}
            assert got[1].delivery_info["redelivered"] is True
            assert got[0].delivery_info["redelivered"] is False
            got[1].ack()
            drain_until(conn, lambda: len(got) == 3)
            assert got[2].payload == {"i": 1}
            got[2].ack()
    assert states(db) == {}
    assert scalar(db, "SELECT count(*) FROM pgbroker.dead_letter") == 0


def test_basic_recover_requeues_unacked(db_url: str, db: psycopg.Connection) -> None:
    queue = Queue("recover")
    with connect(db_url) as conn:
        publish_n(conn, queue, 3)
        got: list[Message] = []
        with Consumer(conn, [queue], callbacks=[collect(got)]) as consumer:
            drain_until(conn, lambda: len(got) == 3)
            got[0].ack()
            assert states(db) == {"reserved": 2}
            consumer.recover(requeue=True)
            assert states(db) == {"ready": 2}
            drain_until(conn, lambda: len(got) == 5)
            assert [m.payload["i"] for m in got[3:]] == [1, 2]
            assert all(m.delivery_info["redelivered"] for m in got[3:])
            for m in got[3:]:
                m.ack()
    assert states(db) == {}


def test_closing_a_consumer_requeues_unacked(db_url: str, db: psycopg.Connection) -> None:
    queue = Queue("closing")
    with connect(db_url) as conn:
        publish_n(conn, queue, 2)
        got: list[Message] = []
        with Consumer(conn, [queue], callbacks=[collect(got)]):
            drain_until(conn, lambda: len(got) == 2)
    assert states(db) == {"ready": 2}
    assert scalar(db, "SELECT count(*) FROM pgbroker.consumer") == 0


def test_purge_size_and_queue_delete(db_url: str, db: psycopg.Connection) -> None:
    ex = Exchange("pq-ex", type="direct")
    queue = Queue("pq", ex, routing_key="pq")
    with connect(db_url) as conn:
        channel = conn.default_channel
        publish_n(conn, queue, 5)
        assert queue(channel).queue_declare(passive=True).message_count == 5
        assert queue(channel).queue_declare().message_count == 5
        # One message reserved: purge and size count only ready ones.
        reserved = queue(channel).get()
        assert reserved is not None
        assert queue(channel).queue_declare(passive=True).message_count == 4
        assert queue(channel).purge() == 4
        assert queue(channel).queue_declare(passive=True).message_count == 0
        assert states(db) == {"reserved": 1}
        reserved.ack()
        publish_n(conn, queue, 2)
        queue(channel).delete()
        assert scalar(db, "SELECT count(*) FROM pgbroker.queue") == 0
        assert scalar(db, "SELECT count(*) FROM pgbroker.binding") == 0
        assert states(db) == {}
        with pytest.raises(Exception, match="NOT_FOUND"):
            queue(channel).queue_declare(passive=True)


def test_queue_delete_if_empty(db_url: str, db: psycopg.Connection) -> None:
    queue = Queue("keepme")
    with connect(db_url) as conn:
        publish_n(conn, queue, 1)
        queue(conn.default_channel).delete(if_empty=True)
        assert scalar(db, "SELECT count(*) FROM pgbroker.queue") == 1


def test_simple_queue_basic_get(db_url: str, db: psycopg.Connection) -> None:
    with connect(db_url) as conn:
        q = conn.SimpleQueue("simple")
        q.put({"a": 1})
        q.put({"a": 2})
        assert q.qsize() == 2
        m = q.get_nowait()
        assert m.payload == {"a": 1}
        assert states(db) == {"ready": 1, "reserved": 1}
        m.ack()
        m2 = q.get(block=True, timeout=5)
        assert m2.payload == {"a": 2}
        m2.ack()
        with pytest.raises(q.Empty):
            q.get_nowait()
        with pytest.raises(q.Empty):
            q.get(timeout=0.3)
        q.close()
        # basic_get with no_ack removes the message at once.
        queue = Queue("simple")
        Producer(conn.default_channel).publish({"a": 3}, routing_key="simple")
        m3 = queue(conn.default_channel).get(no_ack=True)
        assert m3 is not None and m3.payload == {"a": 3}
        assert states(db) == {}


def test_priority_higher_first_fifo_within(db_url: str) -> None:
    queue = Queue("prio", max_priority=9)
    with connect(db_url) as conn:
        producer = Producer(conn.default_channel)
        sent = [(0, "a"), (5, "b"), (9, "c"), (5, "d"), (0, "e"), (9, "f"), (20, "g"), (-3, "h")]
        for priority, name in sent:
            producer.publish(name, routing_key="prio", declare=[queue], priority=priority)
        got: list[Message] = []
        with Consumer(conn, [queue], callbacks=[collect(got)], prefetch_count=1):
            while len(got) < len(sent):
                drain_more(conn, got)
                got[-1].ack()
        # 20 is clamped to 9 and -3 to 0.
        assert [m.payload for m in got] == ["c", "f", "g", "b", "d", "a", "e", "h"]
        assert [m.delivery_info["priority"] for m in got] == [9, 9, 9, 5, 5, 0, 0, 0]


def test_priority_within_one_claim(db_url: str) -> None:
    queue = Queue("prio-batch")
    with connect(db_url) as conn:
        producer = Producer(conn.default_channel)
        for i, priority in enumerate([1, 3, 2, 3, 1]):
            producer.publish(i, routing_key=queue.name, declare=[queue], priority=priority)
        got: list[Message] = []
        with Consumer(conn, [queue], callbacks=[collect(got)], prefetch_count=10):
            drain_until(conn, lambda: len(got) == 5)
        assert [m.payload for m in got] == [1, 3, 2, 0, 4]


def test_message_fields_round_trip(db_url: str, db: psycopg.Connection) -> None:
    queue = Queue("fields")
    with connect(db_url) as conn:
        Producer(conn.default_channel).publish(
            {"x": [1, 2]},
            routing_key="fields",
            declare=[queue],
            headers={"id": "abc", "task": "proj.t", "retries": 2},
            correlation_id="corr",
            reply_to="replies",
            content_encoding="utf-8",
        )
        Producer(conn.default_channel).publish(
            b"\x00\xff raw", routing_key="fields", content_type="application/data"
        )
        got: list[Message] = []
        with Consumer(conn, [queue], callbacks=[collect(got)], accept=["json", "application/data"]):
            drain_until(conn, lambda: len(got) == 2)
        assert got[0].payload == {"x": [1, 2]}
        assert got[0].headers == {"id": "abc", "task": "proj.t", "retries": 2}
        assert got[0].properties["correlation_id"] == "corr"
        assert got[0].properties["reply_to"] == "replies"
        assert got[0].content_type == "application/json"
        assert got[1].body == b"\x00\xff raw"
        assert rows(db, "SELECT task_id, task_name FROM pgbroker.message ORDER BY id") == [
            ("abc", "proj.t"),
            (None, None),
        ]


def test_many_messages_none_lost_or_duplicated(db_url: str, db: psycopg.Connection) -> None:
    queue = Queue("many")
    n = 2000
    with connect(db_url) as conn:
        producer = Producer(conn.default_channel)
        producer.declare()
        queue(conn.default_channel).declare()
        for i in range(n):
            producer.publish(i, routing_key="many")
        seen: list[int] = []

        def on_message(body: Any, message: Message) -> None:
            seen.append(body)
            message.ack()

        with Consumer(conn, [queue], callbacks=[on_message], prefetch_count=50):
            drain_until(conn, lambda: len(seen) >= n, timeout=60)
            drain_quietly(conn, 0.2)
    assert sorted(seen) == list(range(n))
    assert seen == list(range(n))  # one consumer: FIFO
    assert states(db) == {}


def test_two_queues_are_served_fairly(db_url: str) -> None:
    """A backlog on one queue does not starve the other queues, even when
    acks are sent after the claim (as in the event loop)."""
    a, b = Queue("fair-a"), Queue("fair-b")
    with connect(db_url) as conn:
        publish_n(conn, a, 20)
        publish_n(conn, b, 20)
        got: list[Message] = []
        with Consumer(conn, [a, b], callbacks=[collect(got)], prefetch_count=2):
            while len(got) < 10:
                conn.drain_events(timeout=5)
                ack_all(got)
        routed = [m.delivery_info["routing_key"] for m in got[:10]]
        assert routed.count("fair-b") >= 3, routed


WEIRD = [
    "it's",
    'say "hi"',
    "a; DROP TABLE pgbroker.message; --",
    "'); DELETE FROM pgbroker.queue; --",
    "with space",
    "ünïcödé ✓ 日本",
    "back\\slash",
    "per%cent %(name)s %s",
    "{schema}",
    "$1",
]


def test_weird_names_are_stored_verbatim(db_url: str, db: psycopg.Connection) -> None:
    with connect(db_url) as conn:
        channel = conn.default_channel
        for i, name in enumerate(WEIRD):
            direct = Exchange(f"d {name}", type="direct")
            topic = Exchange(f"t {name}", type="topic")
            q = Queue(f"q {name}", direct, routing_key=f"k {name}")
            q(channel).declare()
            Queue(f"q {name}", topic, routing_key=f"{name}.#")(channel).declare()
            producer = Producer(channel)
            producer.publish({"i": i, "via": "direct"}, exchange=direct, routing_key=f"k {name}")
            producer.publish({"i": i, "via": "topic"}, exchange=topic, routing_key=f"{name}.x")
            producer.publish({"i": i, "via": "default"}, routing_key=f"q {name}")
        for i, name in enumerate(WEIRD):
            got = []
            for _ in range(3):
                m = Queue(f"q {name}")(channel).get()
                assert m is not None, name
                got.append((m.payload["via"], m.delivery_info["routing_key"]))
                assert m.payload["i"] == i
                m.ack()
            assert got == [
                ("direct", f"k {name}"),
                ("topic", f"{name}.x"),
                ("default", f"q {name}"),
            ]
    stored = {r[0] for r in rows(db, "SELECT name FROM pgbroker.queue")}
    assert stored == {f"q {name}" for name in WEIRD}
    assert {r[0] for r in rows(db, "SELECT name FROM pgbroker.exchange")} == {
        f"{kind} {name}" for name in WEIRD for kind in "dt"
    }
    assert {
        r[0]
        for r in rows(db, "SELECT routing_key FROM pgbroker.binding WHERE exchange LIKE 'd %%'")
    } == {f"k {name}" for name in WEIRD}
    assert scalar(db, "SELECT count(*) FROM pgbroker.dead_letter") == 0


def test_weird_names_with_consumers(db_url: str) -> None:
    """LISTEN/NOTIFY payloads carry the names verbatim too."""
    queues = [Queue(f"c {name}") for name in WEIRD]
    with connect(db_url) as conn, connect(db_url) as publisher:
        got: list[Message] = []

        def on_message(body: Any, message: Message) -> None:
            got.append(message)
            message.ack()

        with Consumer(conn, queues, callbacks=[on_message]):
            drain_quietly(conn, 0.1)
            producer = Producer(publisher.default_channel)
            for q in queues:
                producer.publish(q.name, routing_key=q.name, declare=[q])
            drain_until(conn, lambda: len(got) == len(queues))
        assert sorted(m.payload for m in got) == sorted(q.name for q in queues)


def test_custom_schema_name_auto_migrates(empty_db_url: str) -> None:
    schema = 'we"ird; schema'
    with connect(empty_db_url, schema=schema) as conn, connect(empty_db_url, schema=schema) as pub:
        queue = Queue("in-weird", Exchange("wx", type="topic"), routing_key="a.#")
        got: list[Message] = []
        with Consumer(conn, [queue], callbacks=[collect(got)]):
            drain_quietly(conn, 0.1)
            Producer(pub.default_channel).publish("hello", exchange="wx", routing_key="a.b")
            drain_until(conn, lambda: len(got) == 1, timeout=5)
            got[0].ack()
        conn.transport.sweep()
    with psycopg.connect(pgserver.libpq_url(empty_db_url), autocommit=True) as db:
        assert scalar(db, "SELECT count(*) FROM pg_namespace WHERE nspname = %s", schema) == 1
        count = db.execute(
            psycopg.sql.SQL("SELECT count(*) FROM {}.queue").format(psycopg.sql.Identifier(schema))
        ).fetchone()
        assert count == (1,)
        assert scalar(db, "SELECT count(*) FROM pg_namespace WHERE nspname = 'pgbroker'") == 0


def test_two_schemas_in_one_database_are_separate(empty_db_url: str) -> None:
    with connect(empty_db_url, schema="Alpha") as a, connect(empty_db_url, schema="beta") as b:
        qa, qb = a.SimpleQueue("same"), b.SimpleQueue("same")
        qa.put("from a")
        qb.put("from b")
        # Consumers in both schemas register at once (advisory lock keys differ).
        assert qa.get(timeout=5).payload == "from a"
        assert qb.get(timeout=5).payload == "from b"
        assert a.transport.consumer_id is not None and b.transport.consumer_id is not None
        # A sweep in one schema does not mistake the other's consumers for dead ones.
        assert a.transport.sweep() == (0, 0, 0)
        qa.close()
        qb.close()


# --- idle consumers ---------------------------------------------------------------


def xact_commits(admin: psycopg.Connection, dbname: str) -> int:
    return int(scalar(admin, "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", dbname))


def session_of(conn: Connection) -> int:
    pg = conn.transport._conn
    assert pg is not None
    return pg.info.backend_pid


def close_and_wait(conn: Connection, admin: psycopg.Connection) -> None:
    """Close conn and wait until its server session has ended: a backend
    flushes its statistics when it exits."""
    pid = session_of(conn)
    conn.close()
    deadline = time.monotonic() + 10
    while scalar(admin, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", pid):
        assert time.monotonic() < deadline
        time.sleep(0.02)


def run_idle_consumer(url: str, admin: psycopg.Connection, seconds: float) -> None:
    """Set a consumer up, wait in drain_events, close."""
    conn = connect(url, sweep_interval=10)
    try:
        with (
            Consumer(conn, [Queue("idle")], callbacks=[lambda body, message: None]),
            pytest.raises(TimeoutError),
        ):
            conn.drain_events(timeout=seconds)
    finally:
        close_and_wait(conn, admin)


def test_idle_consumer_sends_no_queries(db_url: str, pg_admin_url: str) -> None:
    dbname = db_url.rsplit("/", 1)[1].split("?")[0]
    # Measured from the admin database, so the measurement adds no commits.
    with psycopg.connect(pgserver.libpq_url(pg_admin_url), autocommit=True) as admin:
        setup = connect(db_url)
        Queue("idle")(setup.default_channel).declare()
        close_and_wait(setup, admin)
        extra = []
        # A second try only if the first saw more: an autovacuum worker
        # visiting the database also counts in xact_commit.
        for _ in range(2):
            c0 = xact_commits(admin, dbname)
            run_idle_consumer(db_url, admin, 0.01)
            c1 = xact_commits(admin, dbname)
            run_idle_consumer(db_url, admin, 3.0)
            c2 = xact_commits(admin, dbname)
            short, long = c1 - c0, c2 - c1
            print(f"idle consumer: {short} commits with a 0.01 s wait, {long} with a 3 s wait")
            assert short > 3  # the measurement sees the consumer's own queries
            extra.append(long - short)
            if long - short <= 3:
                break
    # Three seconds of waiting cost at most two queries more than none, plus
    # the one SET the sweeper thread's new session starts with (the settings
    # every pgbroker session pins: pgbroker.database.sessions.session_settings), which only
    # the longer wait lets it reach.
    assert min(extra) <= 3, extra


def test_notify_wakes_a_blocked_consumer_promptly(db_url: str) -> None:
    queue = Queue("wake")
    with connect(db_url, sweep_interval=10) as conn, connect(db_url) as publisher:
        got: list[tuple[float, Message]] = []

        def on_message(body: Any, message: Message) -> None:
            got.append((time.monotonic(), message))
            message.ack()

        with Consumer(conn, [queue], callbacks=[on_message]):
            drain_quietly(conn, 0.1)
            latencies = []
            for i in range(3):
                sent: list[float] = []

                def publish_later(i: int = i, sent: list[float] = sent) -> None:
                    # Time for the consumer to block in drain_events (a wait
                    # in the client, with nothing to see from the server).
                    time.sleep(0.3)
                    sent.append(time.monotonic())
                    Producer(publisher.default_channel).publish(i, routing_key="wake")

                thread = threading.Thread(target=publish_later)
                thread.start()
                try:
                    conn.drain_events(timeout=10)
                finally:
                    thread.join()
                assert got[-1][1].payload == i
                latencies.append(got[-1][0] - sent[0])
        print("wake-up latencies (s):", [round(x, 4) for x in latencies])
        assert max(latencies) < 0.5, latencies


# --- Celery's path: the event loop ---------------------------------------------------


def test_event_loop_consumer(db_url: str, db: psycopg.Connection) -> None:
    """With a Kombu hub (as in a Celery worker): the session's socket wakes
    the loop, claims respect prefetch, acks go in batches at the next tick,
    and two busy queues share the capacity."""
    from kombu.asynchronous import Hub

    a, b = Queue("loop-a"), Queue("loop-b")
    hub = Hub()
    conn = connect(db_url)
    try:
        with connect(db_url) as publisher:
            publish_n(publisher, a, 20)
            publish_n(publisher, b, 20)
        ack_batches: list[int] = []  # acks per statement: an ack or a claim's
        ack_statements: list[int] = []
        run_count, run_all = conn.transport.run_count, conn.transport.run_all

        def counting_run_count(query: str, /, **params: Any) -> int:
            if query == "ack":
                ack_batches.append(len(params["ids"]))
                ack_statements.append(len(params["ids"]))
            return run_count(query, **params)

        def counting_run_all(query: str, /, **params: Any) -> list[Any]:
            if query == "claim" and params["acks"]:
                ack_batches.append(len(params["acks"]))
            return run_all(query, **params)

        conn.transport.run_count = counting_run_count
        conn.transport.run_all = counting_run_all
        conn.register_with_event_loop(hub)
        got: list[tuple[float, Message]] = []

        def on_message(body: Any, message: Message) -> None:
            got.append((time.monotonic(), message))
            message.ack()

        def run_until(done: Any, timeout: float = 10) -> None:
            deadline = time.monotonic() + timeout
            while not done():
                assert time.monotonic() < deadline, "event loop made no progress"
                hub.run_once()

        Consumer(conn, [a, b], callbacks=[on_message], prefetch_count=2).consume()
        run_until(lambda: len(got) == 40)
        run_until(lambda: sum(ack_batches) == 40)
        assert scalar(db, "SELECT count(*) FROM pgbroker.message") == 0
        # Acks go in batches, not one statement per message: each claim pass
        # takes up to the prefetch count from each of the two queues...
        assert 1 < max(ack_batches) <= 4, ack_batches
        # ...and a tick's acks commit with the next tick's claim: a statement
        # of their own only when no claim follows (a queue found empty, the
        # last batch). (Before: one ack statement per batch.)
        assert len(ack_statements) <= len(ack_batches) / 3, (ack_statements, ack_batches)
        first = [m.delivery_info["routing_key"] for _, m in got[:10]]
        assert first.count("loop-b") >= 3, first

        # A message published elsewhere wakes the loop promptly.
        with connect(db_url) as publisher:
            for i in range(3):
                time.sleep(0.2)  # the loop is idle (nothing to see from the server)
                sent = time.monotonic()
                Producer(publisher.default_channel).publish(i, routing_key="loop-b")
                run_until(lambda n=41 + i: len(got) == n)
                assert got[-1][0] - sent < 0.5
    finally:
        hub.close()
        conn.close()


ACKING_CONSUMER = """
import os
from kombu import Connection, Consumer, Queue
def on_message(body, message):
    print(body["i"], flush=True)
    message.ack()
conn = Connection(os.environ["TEST_URL"], transport_options={"sweep_interval": 0.3})
with Consumer(conn, [Queue("shared")], callbacks=[on_message], prefetch_count=10):
    print("ready", flush=True)
    while True:
        try:
            conn.drain_events(timeout=1)
        except TimeoutError:
            pass
"""


def test_competing_consumers_share_without_duplicates(db_url: str) -> None:
    n = 600
    with Child(ACKING_CONSUMER, db_url) as c1, Child(ACKING_CONSUMER, db_url) as c2:
        assert c1.read_line() == "ready" and c2.read_line() == "ready"
        with connect(db_url) as conn:
            publish_n(conn, Queue("shared"), n)
        seen: dict[Child, list[int]] = {c1: [], c2: []}
        deadline = time.monotonic() + 60
        while sum(len(v) for v in seen.values()) < n:
            assert time.monotonic() < deadline, {c: len(v) for c, v in seen.items()}
            for child, got in seen.items():
                with contextlib.suppress(Empty):
                    got.append(int(child.lines.get(timeout=0.05)))
    everything = seen[c1] + seen[c2]
    assert sorted(everything) == list(range(n))  # none lost, none twice
    assert seen[c1] and seen[c2], "both consumers took part"


def test_callback_error_hands_back_the_rest_of_the_claim(
    db_url: str, db: psycopg.Connection
) -> None:
    queue = Queue("raising")
    with connect(db_url) as conn:
        publish_n(conn, queue, 3)
        got: list[Message] = []

        def on_message(body: Any, message: Message) -> None:
            got.append(message)
            if body["i"] == 0:
                raise RuntimeError("boom")

        with Consumer(conn, [queue], callbacks=[on_message], prefetch_count=3):
            with pytest.raises(RuntimeError, match="boom"):
                conn.drain_events(timeout=5)
            assert len(got) == 1
            # Only the message the application saw is held; the others are ready.
            assert states(db) == {"reserved": 1, "ready": 2}
            drain_until(conn, lambda: len(got) == 3)
            assert [m.payload["i"] for m in got] == [0, 1, 2]
            assert [m.delivery_info["redelivered"] for m in got] == [False, False, False]
            ack_all(got)
    assert states(db) == {}


def test_no_ack_consumer_removes_messages_as_it_takes_them(
    db_url: str, db: psycopg.Connection
) -> None:
    queue = Queue("noack")
    with connect(db_url) as conn:
        publish_n(conn, queue, 150)  # more than one claim
        got: list[Message] = []
        with Consumer(conn, [queue], callbacks=[collect(got)], no_ack=True, prefetch_count=5):
            drain_until(conn, lambda: len(got) == 150)
            assert states(db) == {}
        assert [m.payload["i"] for m in got] == list(range(150))
