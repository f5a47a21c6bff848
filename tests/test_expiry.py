"""TTL and queue expiry: per-message expiration, x-message-ttl and x-expires."""

from __future__ import annotations

import time
from datetime import timedelta

import psycopg
from kombu import Consumer, Exchange, Message, Producer, Queue

from tests.kombu_helpers import collect, connect, drain_until, rows, scalar, wait_for


def test_message_expiration(db_url: str, db: psycopg.Connection) -> None:
    queue = Queue("ttl-msg")
    with connect(db_url, sweep_interval=60) as conn:
        producer = Producer(conn.default_channel)
        producer.publish("short", routing_key=queue.name, declare=[queue], expiration=0.2)
        producer.publish("long", routing_key=queue.name, expiration=60)
        producer.publish("forever", routing_key=queue.name)
        time.sleep(0.4)  # on purpose: the 0.2 s TTL elapses
        # Not delivered although no sweep has removed it yet.
        assert scalar(db, "SELECT count(*) FROM pgbroker.message") == 3
        assert queue(conn.default_channel).queue_declare(passive=True).message_count == 3
        got = [queue(conn.default_channel).get() for _ in range(3)]
        assert [m.payload if m else None for m in got] == ["long", "forever", None]
        for m in got[:2]:
            assert m is not None
            m.ack()
        assert conn.transport.sweep() == (0, 1, 0)
    assert scalar(db, "SELECT count(*) FROM pgbroker.message") == 0


def test_queue_message_ttl(db_url: str, db: psycopg.Connection) -> None:
    queue = Queue("ttl-q", message_ttl=0.3)
    with connect(db_url, sweep_interval=60) as conn:
        producer = Producer(conn.default_channel)
        producer.publish("a", routing_key=queue.name, declare=[queue])
        producer.publish("b", routing_key=queue.name, expiration=0.1)  # shorter wins
        producer.publish("c", routing_key=queue.name, expiration=60)  # queue TTL wins
        assert rows(db, "SELECT message_ttl, arguments FROM pgbroker.queue") == [
            (timedelta(seconds=0.3), {"x-message-ttl": 300})
        ]
        ttls = rows(
            db,
            "SELECT round(extract(epoch FROM expires_at - published_at)::numeric, 2)::float"
            " FROM pgbroker.message ORDER BY id",
        )
        assert ttls == [(0.3,), (0.1,), (0.3,)]
        time.sleep(0.5)  # on purpose: every TTL (0.3 s at most) elapses
        assert queue(conn.default_channel).get() is None
        assert conn.transport.sweep() == (0, 3, 0)
        producer.publish("d", routing_key=queue.name)
        m = queue(conn.default_channel).get()
        assert m is not None and m.payload == "d"
        m.ack()


def test_expired_messages_removed_by_a_consumers_own_sweep(
    db_url: str, db: psycopg.Connection
) -> None:
    queue = Queue("swept", message_ttl=0.2)
    other = Queue("busy")
    with connect(db_url, sweep_interval=0.2) as conn, connect(db_url) as publisher:
        Producer(publisher.default_channel).publish("x", routing_key="swept", declare=[queue])
        got: list[Message] = []
        # The consumer listens elsewhere; its periodic sweep still cleans up.
        with Consumer(conn, [other], callbacks=[collect(got)]):
            drain_until(
                conn,
                lambda: scalar(db, "SELECT count(*) FROM pgbroker.message") == 0,
                timeout=5,
            )
        assert got == []


def test_unused_queue_expires_with_its_messages(db_url: str, db: psycopg.Connection) -> None:
    queue = Queue("exp-q", Exchange("exp-x", type="direct"), routing_key="k", expires=0.5)
    with connect(db_url, sweep_interval=60) as conn:
        producer = Producer(conn.default_channel)
        producer.publish("m1", exchange="exp-x", routing_key="k", declare=[queue])
        producer.publish("m2", exchange="exp-x", routing_key="k")
        assert scalar(db, "SELECT expires FROM pgbroker.queue") == timedelta(seconds=0.5)
        assert conn.transport.sweep() == (0, 0, 0)
        # On purpose: 0.6 s pass, more than x-expires, but with a use after
        # 0.3 s; then the whole x-expires passes after that use.
        time.sleep(0.3)
        queue(conn.default_channel).declare()  # redeclaring counts as use
        time.sleep(0.3)
        assert conn.transport.sweep() == (0, 0, 0)
        time.sleep(0.4)
        assert conn.transport.sweep() == (0, 0, 1)
    assert scalar(db, "SELECT count(*) FROM pgbroker.queue") == 0
    assert scalar(db, "SELECT count(*) FROM pgbroker.binding") == 0
    assert scalar(db, "SELECT count(*) FROM pgbroker.message") == 0
    assert scalar(db, "SELECT count(*) FROM pgbroker.exchange") == 1


def test_queue_with_a_live_consumer_does_not_expire(db_url: str, db: psycopg.Connection) -> None:
    queue = Queue("live-q", expires=0.3)
    with connect(db_url, sweep_interval=60) as consumer, connect(db_url) as sweeper:
        c = Consumer(consumer, [queue], callbacks=[collect([])])
        c.consume()
        time.sleep(0.6)  # on purpose: longer than x-expires, but the consumer is alive
        sweeper.transport._ensure_consumer()
        assert sweeper.transport.sweep() == (0, 0, 0)
        assert scalar(db, "SELECT count(*) FROM pgbroker.queue") == 1
        # Once the consumer is gone, the expiry counts from its departure.
        c.cancel()
        assert sweeper.transport.sweep() == (0, 0, 0)
        time.sleep(0.5)  # on purpose: x-expires (0.3 s) elapses after the departure
        assert sweeper.transport.sweep() == (0, 0, 1)
    assert scalar(db, "SELECT count(*) FROM pgbroker.queue") == 0


def test_queue_of_a_dead_consumer_expires_after_the_death(
    db_url: str, db: psycopg.Connection
) -> None:
    queue = Queue("orphan-q", expires=0.5)
    a = connect(db_url, sweep_interval=60)
    try:
        Consumer(a, [queue], callbacks=[collect([])]).consume()
        time.sleep(0.6)  # on purpose: longer than x-expires, but the consumer is alive
        scalar(db, "SELECT pg_terminate_backend(%s)", a.transport._conn.info.backend_pid)
        with connect(db_url, sweep_interval=60) as b:
            b.transport._ensure_consumer()

            def dead_consumer_swept() -> bool:
                b.transport.sweep()
                return scalar(db, "SELECT count(*) FROM pgbroker.consumer") == 1

            wait_for(dead_consumer_swept, timeout=5)
            assert scalar(db, "SELECT count(*) FROM pgbroker.queue") == 1
            time.sleep(0.6)  # on purpose: x-expires elapses after the death was seen
            assert b.transport.sweep() == (0, 0, 1)
    finally:
        a.close()


def test_expired_queue_takes_its_reserved_messages_with_it(
    db_url: str, db: psycopg.Connection
) -> None:
    """A queue removed by x-expires leaves no message behind, not even one a
    client still holds (its ack then does nothing, as after queue_delete)."""
    queue = Queue("exp-held", expires=0.3)
    with connect(db_url, sweep_interval=60) as conn:
        Producer(conn.default_channel).publish("x", routing_key=queue.name, declare=[queue])
        held = queue(conn.default_channel).get()
        assert held is not None
        time.sleep(0.5)  # on purpose: x-expires (0.3 s) elapses
        assert conn.transport.sweep() == (0, 0, 1)
        assert scalar(db, "SELECT count(*) FROM pgbroker.message") == 0
        held.ack()
    assert scalar(db, "SELECT count(*) FROM pgbroker.dead_letter") == 0


def test_the_sweep_deletes_expired_results_a_batch_at_a_time(
    db_url: str, db: psycopg.Connection
) -> None:
    """Results past their expires_at (result_expires when stored) and
    expired queues' messages go in batches; the sweep runs again while a
    batch comes back full, so a backlog far larger than a batch goes."""
    from pgbroker.broker import sweeper

    backlog = 3 * sweeper.HOUSEKEEP_BATCH + 7
    db.execute(
        "INSERT INTO pgbroker.task_result (task_id, state, content_type, content_encoding, "
        "expires_at) SELECT 'r' || i, 'SUCCESS', 'application/json', 'utf-8', "
        "now() - interval '1 second' FROM generate_series(1, %s) i",
        [backlog],
    )
    db.execute(
        "INSERT INTO pgbroker.task_result (task_id, state, content_type, content_encoding, "
        "expires_at) VALUES ('later', 'SUCCESS', 'application/json', 'utf-8', "
        "now() + interval '1 hour'), ('never', 'SUCCESS', 'application/json', 'utf-8', NULL)"
    )
    with connect(db_url, sweep_interval=60) as conn:
        conn.transport.sweep()
    assert rows(db, "SELECT task_id FROM pgbroker.task_result ORDER BY 1") == [
        ("later",),
        ("never",),
    ]
