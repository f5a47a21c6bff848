"""Auto-delete and exclusive queues go as in AMQP: an auto-delete queue when
its last consumer goes (cancelled, connection closed, or dead and swept), an
exclusive queue with the connection that declared it; with their bindings
and messages. Other queues stay.

A kombu.common.Broadcast queue (bcast.<uuid>, auto-delete) is the case that
matters: one per consumer, per Celery worker start.
"""

from __future__ import annotations

import signal
from pathlib import Path

import psycopg
from kombu import Consumer, Exchange, Message, Producer, Queue
from kombu.common import Broadcast

from pgbroker.database import queries
from tests.celery_helpers import celery_env, client_app, start_worker, wait_until
from tests.kombu_helpers import Child, collect, connect, drain_until, scalar

#: No sweep but the ones a test runs.
NO_SWEEP = {"fast_recovery": False, "sweep_interval": 3600.0}


def leftovers(db: psycopg.Connection, queue: str) -> tuple[int, int, int]:
    """(queue rows, bindings, messages) of ``queue``."""
    return (
        scalar(db, "SELECT count(*) FROM pgbroker.queue WHERE name = %s", queue),
        scalar(db, "SELECT count(*) FROM pgbroker.binding WHERE queue = %s", queue),
        scalar(db, "SELECT count(*) FROM pgbroker.message WHERE queue = %s", queue),
    )


def test_broadcast_queue_goes_when_its_consumer_cancels(
    db_url: str, db: psycopg.Connection
) -> None:
    bq = Broadcast("bc-cancel")
    got: list[Message] = []
    with connect(db_url) as conn:
        producer = Producer(conn.default_channel)
        consumer = Consumer(conn, [bq], callbacks=[collect(got)])
        consumer.consume()
        name = bq.name
        assert name and name.startswith("bcast.")
        producer.publish("one", exchange=bq.exchange, declare=[bq.exchange])
        drain_until(conn, lambda: len(got) == 1)
        producer.publish("unread", exchange=bq.exchange)
        assert leftovers(db, name) == (1, 1, 2)  # one delivered, not acked
        consumer.cancel()
        assert leftovers(db, name) == (0, 0, 0)
        # Later fanout publishes store nothing for it.
        producer.publish("later", exchange=bq.exchange)
        assert leftovers(db, name) == (0, 0, 0)


def test_broadcast_queue_goes_when_its_connection_closes(
    db_url: str, db: psycopg.Connection
) -> None:
    bq = Broadcast("bc-close")
    conn = connect(db_url)
    try:
        Consumer(conn, [bq], callbacks=[collect([])]).consume()  # never cancelled
        Producer(conn.default_channel).publish("unread", exchange=bq.exchange)
        name = bq.name
        assert name is not None
        assert leftovers(db, name) == (1, 1, 1)
    finally:
        conn.release()
    assert leftovers(db, name) == (0, 0, 0)


KILLED_BROADCAST_CONSUMER = """
import os
from kombu import Connection, Consumer
from kombu.common import Broadcast
conn = Connection(os.environ["TEST_URL"],
                  transport_options={"fast_recovery": False, "sweep_interval": 3600})
bq = Broadcast("bc-killed")
Consumer(conn, [bq], callbacks=[lambda body, message: None]).consume()
ex = Broadcast("ex-killed", queue="ex-killed", exclusive=True, auto_delete=False)
ex(conn.default_channel).declare()
print(bq.name, flush=True)
while True:
    try:
        conn.drain_events(timeout=1)
    except TimeoutError:
        pass
"""


def test_queues_of_a_killed_consumer_go_after_the_sweep(
    db_url: str, db: psycopg.Connection
) -> None:
    """SIGKILLed: its auto-delete queue (and its exclusive one) stay until the
    sweep removes the dead consumer, messages published meanwhile included."""
    with Child(KILLED_BROADCAST_CONSUMER, db_url) as child:
        name = child.read_line()
        assert name.startswith("bcast.")
        child.proc.send_signal(signal.SIGKILL)
        child.proc.wait(10)
    with connect(db_url, **NO_SWEEP) as conn:
        Producer(conn.default_channel).publish(
            "meanwhile", exchange=Exchange("bc-killed", type="fanout")
        )
        assert leftovers(db, name) == (1, 1, 1)
        assert leftovers(db, "ex-killed") == (1, 1, 0)
        conn.transport.sweep()
    assert leftovers(db, name) == (0, 0, 0)
    assert leftovers(db, "ex-killed") == (0, 0, 0)


def test_queue_with_two_consumers_stays_until_the_last_goes(
    db_url: str, db: psycopg.Connection
) -> None:
    bq = Broadcast("bc-shared", queue="bc-shared-q")
    with connect(db_url) as one, connect(db_url) as two:
        first = Consumer(one, [bq], callbacks=[collect([])])
        second = Consumer(two, [bq], callbacks=[collect([])])
        first.consume()
        second.consume()
        Producer(one.default_channel).publish("x", exchange=bq.exchange)
        first.cancel()
        assert leftovers(db, "bc-shared-q") == (1, 1, 1)
        one.release()
        assert leftovers(db, "bc-shared-q") == (1, 1, 1)
        second.cancel()
        assert leftovers(db, "bc-shared-q") == (0, 0, 0)


def test_exclusive_queue_goes_with_its_connection(db_url: str, db: psycopg.Connection) -> None:
    """Declared, never consumed: it stays while its connection lives."""
    q = Queue("ex-q", Exchange("ex-x", type="direct"), "k", exclusive=True)
    with connect(db_url) as conn, connect(db_url) as other:
        q(conn.default_channel).declare()
        Producer(other.default_channel).publish("x", exchange="ex-x", routing_key="k")
        assert leftovers(db, "ex-q") == (1, 1, 1)
        other.release()  # another connection closing changes nothing
        assert leftovers(db, "ex-q") == (1, 1, 1)
    assert leftovers(db, "ex-q") == (0, 0, 0)


def test_other_queues_stay(db_url: str, db: psycopg.Connection) -> None:
    """A queue that is not auto-delete stays when its consumers go, and so
    does an auto-delete queue that never had a consumer (as in AMQP)."""
    plain = Queue("ad-plain", Exchange("ad-x", type="fanout"))
    unconsumed = Queue("ad-unconsumed", Exchange("ad-x", type="fanout"), auto_delete=True)
    with connect(db_url) as conn:
        unconsumed(conn.default_channel).declare()
        with Consumer(conn, [plain], callbacks=[collect([])]):
            Producer(conn.default_channel).publish("x", exchange="ad-x")
    with connect(db_url, **NO_SWEEP) as conn:
        conn.transport.sweep()
    assert leftovers(db, "ad-plain") == (1, 1, 1)
    assert leftovers(db, "ad-unconsumed") == (1, 1, 1)


def test_celery_worker_restarts_leave_no_broadcast_queue(
    db_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    """A worker with a Broadcast queue in task_queues, stopped twice and
    SIGKILLed once: no bcast queue is left, and broadcast tasks still run."""
    env = celery_env(db_url)
    app = "tests.apps.broadcast_app"

    def bcast_queues() -> int:
        return int(scalar(db, "SELECT count(*) FROM pgbroker.queue WHERE name LIKE 'bcast.%%'"))

    with client_app(app, db_url) as tasks:
        for i, how in enumerate(["stop", "kill", "stop"]):
            with start_worker(app, env, tmp_path, name=f"w{i}") as worker:
                worker.wait_for_log("ready.")
                # The killed worker's queue is gone once this one has swept.
                wait_until(lambda: bcast_queues() == 1, 30, "one bcast queue")
                tasks.shout.delay(f"run {i}")
                worker.wait_for_log(f"shouted run {i}")
                if how == "kill":
                    worker.kill_group()
                    worker.wait_exit(10)
                    assert bcast_queues() == 1  # until a sweep
        assert bcast_queues() == 0
    assert scalar(db, "SELECT count(*) FROM pgbroker.binding WHERE queue LIKE 'bcast.%%'") == 0
    assert scalar(db, "SELECT count(*) FROM pgbroker.message WHERE queue LIKE 'bcast.%%'") == 0


def test_a_redeclared_queue_its_consumers_left_is_not_swept_before_its_bind(
    db_url: str, db: psycopg.Connection
) -> None:
    """A worker's new session redeclares its lost session's auto-delete
    queue (Celery's pidbox queue), which has had consumers and has none now.
    As in AMQP the declaration creates it anew, so another worker's sweep
    between the declaration and the bind leaves it (the bind failed on the
    foreign key: a worker crash)."""
    queue = Queue("redeclared", Exchange("redeclared", type="fanout"), auto_delete=True)
    with connect(db_url, **NO_SWEEP) as conn:
        Consumer(conn, [queue], callbacks=[collect([])]).consume()
    # Its consumer is gone (its connection closed): the queue went with it.
    assert leftovers(db, "redeclared") == (0, 0, 0)
    # As a lost session leaves it: consumed, no consumer, not swept yet.
    with connect(db_url, **NO_SWEEP) as conn:
        channel = conn.default_channel
        queue(channel).declare()
        db.execute("UPDATE pgbroker.queue SET consumed = true WHERE name = 'redeclared'")
        channel.queue_declare("redeclared", auto_delete=True)
        # Another worker's sweep, between the two: it removed the lost
        # session's consumer, and drops the queues their consumers left.
        db.execute(
            queries.for_schema("pgbroker", "queries.sql")["drop_unused_queues"], {"queue": None}
        )
        channel.queue_bind("redeclared", "redeclared", "")
        assert leftovers(db, "redeclared") == (1, 1, 0)
        Consumer(conn, [queue], callbacks=[collect([])]).consume()
        assert scalar(db, "SELECT consumed FROM pgbroker.queue WHERE name = 'redeclared'")
    assert leftovers(db, "redeclared") == (0, 0, 0)  # went with its consumer, as before


def test_a_redeclared_queue_whose_consumer_died_unswept_is_not_swept_before_its_bind(
    db_url: str, db: psycopg.Connection
) -> None:
    """The same, when the lost session's consumer is still registered (its
    session is gone, no sweep has removed it yet): its consumer_queue row
    must not count as a consumer. The sweep that then removes it drops the
    queues their consumers left, and the new session's bind failed on the
    foreign key (seen in CI: the worker stopped, "Unrecoverable error")."""
    queue = Queue("orphaned", Exchange("orphaned", type="fanout"), auto_delete=True)
    with connect(db_url, **NO_SWEEP) as conn:
        channel = conn.default_channel
        queue(channel).declare()
        # The lost session's consumer: registered, attached, its lock gone.
        (dead,) = db.execute(
            "INSERT INTO pgbroker.consumer (hostname, pid) VALUES ('gone', 1) RETURNING id"
        ).fetchone() or (None,)
        db.execute(
            "INSERT INTO pgbroker.consumer_queue (consumer_id, queue) VALUES (%s, 'orphaned')",
            [dead],
        )
        db.execute("UPDATE pgbroker.queue SET consumed = true WHERE name = 'orphaned'")
        channel.queue_declare("orphaned", auto_delete=True)
        # A sweep between the two: it removes the dead consumer, then drops
        # the queues their consumers left.
        db.execute("DELETE FROM pgbroker.consumer WHERE id = %s", [dead])
        db.execute(
            queries.for_schema("pgbroker", "queries.sql")["drop_unused_queues"], {"queue": None}
        )
        channel.queue_bind("orphaned", "orphaned", "")
        assert leftovers(db, "orphaned") == (1, 1, 0)
        Consumer(conn, [queue], callbacks=[collect([])]).consume()
    assert leftovers(db, "orphaned") == (0, 0, 0)  # went with its consumer, as before


def test_a_redeclared_queue_with_a_live_consumer_keeps_going_with_it(
    db_url: str, db: psycopg.Connection
) -> None:
    """A declaration while a live consumer is attached does not make the
    queue new: it still goes when that consumer leaves, as in AMQP."""
    queue = Queue("shared-ad", Exchange("shared-ad", type="fanout"), auto_delete=True)
    with connect(db_url, **NO_SWEEP) as consuming:
        Consumer(consuming, [queue], callbacks=[collect([])]).consume()
        with connect(db_url, **NO_SWEEP) as other:
            other.default_channel.queue_declare("shared-ad", auto_delete=True)
        assert scalar(db, "SELECT consumed FROM pgbroker.queue WHERE name = 'shared-ad'")
    assert leftovers(db, "shared-ad") == (0, 0, 0)
