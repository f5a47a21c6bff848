"""Exchanges, bindings and routing, all stored and evaluated in PostgreSQL."""

from __future__ import annotations

import logging

import psycopg
import pytest
from celery import Celery
from kombu import Connection, Exchange, Producer, Queue
from kombu.exceptions import ChannelError
from kombu.transport.virtual import NotEquivalentError

from pgbroker.broker.routing import topic_pattern
from tests.kombu_helpers import connect, rows, run, scalar

# (binding key, routing key, matches?) in AMQP topic semantics.
TOPIC_CASES = [
    ("a.#", "a", True),  # '#' matches zero words
    ("a.#", "a.b", True),
    ("a.#", "a.b.c", True),
    ("a.#", "b", False),
    ("a.#", "ab", False),
    ("a.#", "b.a", False),
    ("#", "a", True),
    ("#", "a.b.c", True),
    ("#", "", True),
    ("#.c", "c", True),
    ("#.c", "a.b.c", True),
    ("#.c", "a.b.cd", False),
    ("a.#.c", "a.c", True),
    ("a.#.c", "a.x.y.c", True),
    ("a.#.c", "a.x.y", False),
    ("a.#.#", "a", True),
    ("#.#", "a.b", True),
    ("*", "a", True),
    ("*", "a.b", False),
    ("a.*", "a.b", True),
    ("a.*", "a", False),
    ("a.*", "a.b.c", False),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a.c", False),
    ("*.#", "a", True),
    ("*.#", "a.b.c", True),
    ("#.*", "a", True),
    ("*.*", "a", False),
    ("a.b", "a.b", True),
    ("a.b", "axb", False),  # the dot is not a regex wildcard
    ("a..b", "a..b", True),
    ("a..b", "a.b", False),
    # Regular-expression characters in binding keys are literals.
    ("a+b", "a+b", True),
    ("a+b", "aab", False),
    ("a|b", "a", False),
    ("a|b", "a|b", True),
    ("(x)", "(x)", True),
    ("(x)", "x", False),
    ("[a]", "a", False),
    ("[a]", "[a]", True),
    ("x$", "x$", True),
    ("^a", "a", False),
    ("^a", "^a", True),
    ("a{2}", "aa", False),
    ("a?", "a", False),
    ("\\d", "1", False),
    ("\\d", "\\d", True),
    ("a b", "a b", True),
    ("it's; DROP TABLE x", "it's; DROP TABLE x", True),
    ("café.*", "café.crème", True),
    ("日本.#", "日本", True),
    ("*.b", "a.bb", False),
]


def test_topic_pattern_in_postgres(db: psycopg.Connection) -> None:
    for binding_key, routing_key, expected in TOPIC_CASES:
        got = scalar(db, "SELECT ('.' || %s::text) ~ %s", routing_key, topic_pattern(binding_key))
        assert got is expected, (binding_key, routing_key)


def queued(db: psycopg.Connection) -> list[tuple[str, str]]:
    """(queue, routing key) of every stored message, sorted."""
    return [
        (q, k)
        for q, k in rows(db, "SELECT queue, routing_key FROM pgbroker.message ORDER BY queue, id")
    ]


def declare(conn: Connection, exchange: Exchange, bindings: dict[str, str]) -> None:
    """Declare one queue per (queue name -> binding key)."""
    channel = conn.default_channel
    for name, key in bindings.items():
        Queue(name, exchange, routing_key=key)(channel).declare()


def test_direct_exchange(db_url: str, db: psycopg.Connection) -> None:
    ex = Exchange("ex.direct", type="direct")
    with connect(db_url) as conn:
        declare(conn, ex, {"q1": "k1", "q2": "k2", "q3": "k1"})
        producer = Producer(conn.default_channel, exchange=ex)
        producer.publish("one", routing_key="k1")
        producer.publish("two", routing_key="k2")
        producer.publish("none", routing_key="k3", delivery_mode=1)
    assert queued(db) == [("q1", "k1"), ("q2", "k2"), ("q3", "k1")]
    assert scalar(db, "SELECT type FROM pgbroker.exchange WHERE name = 'ex.direct'") == "direct"


def test_topic_exchange(db_url: str, db: psycopg.Connection) -> None:
    ex = Exchange("ex.topic", type="topic")
    with connect(db_url) as conn:
        declare(conn, ex, {"star": "a.*", "hash": "a.#", "all": "#", "end": "*.b"})
        producer = Producer(conn.default_channel, exchange=ex)
        for key in ("a", "a.b", "x.b", "a.b.c"):
            producer.publish(key, routing_key=key)
    assert queued(db) == [
        ("all", "a"),
        ("all", "a.b"),
        ("all", "x.b"),
        ("all", "a.b.c"),
        ("end", "a.b"),
        ("end", "x.b"),
        ("hash", "a"),
        ("hash", "a.b"),
        ("hash", "a.b.c"),
        ("star", "a.b"),
    ]


def test_fanout_exchange(db_url: str, db: psycopg.Connection) -> None:
    ex = Exchange("ex.fanout", type="fanout")
    with connect(db_url) as conn:
        declare(conn, ex, {"f1": "x", "f2": "y", "f3": ""})
        Producer(conn.default_channel, exchange=ex).publish("hi", routing_key="anything")
    assert queued(db) == [("f1", "anything"), ("f2", "anything"), ("f3", "anything")]


def test_default_exchange_routes_by_queue_name(db_url: str, db: psycopg.Connection) -> None:
    with connect(db_url) as conn:
        Queue("plain")(conn.default_channel).declare()
        producer = Producer(conn.default_channel)
        producer.publish("hi", routing_key="plain")
        producer.publish("lost", routing_key="no-such-queue")
    assert queued(db) == [("plain", "plain")]
    assert rows(db, "SELECT reason, routing_key FROM pgbroker.dead_letter") == [
        ("unroutable", "no-such-queue")
    ]


def test_binding_made_on_one_connection_routes_for_another(
    db_url: str, db: psycopg.Connection
) -> None:
    ex = Exchange("shared", type="direct")
    with connect(db_url) as conn:
        declare(conn, ex, {"bound": "key"})
    # A fresh connection that never declared anything routes through it.
    with connect(db_url) as other:
        Producer(other.default_channel).publish("x", exchange="shared", routing_key="key")
        assert ("bound", "shared", "key") in list(other.default_channel.list_bindings())
    assert queued(db) == [("bound", "key")]


BIND_IN_CHILD = """
import os
from kombu import Connection, Exchange, Queue
with Connection(os.environ["TEST_URL"]) as conn:
    ex = Exchange("events", type="topic")
    Queue("child-q", ex, routing_key="task.#")(conn.default_channel).declare()
"""


def test_binding_made_in_another_process(db_url: str, db: psycopg.Connection) -> None:
    run(BIND_IN_CHILD, db_url)
    with connect(db_url) as conn:
        producer = Producer(conn.default_channel)
        producer.publish({"n": 1}, exchange="events", routing_key="task.succeeded")
        producer.publish({"n": 2}, exchange="events", routing_key="task")
        producer.publish({"n": 3}, exchange="events", routing_key="worker.online")
        q = conn.SimpleQueue("child-q")
        got = [q.get(timeout=5) for _ in range(2)]
        for m in got:
            m.ack()
        assert [m.payload["n"] for m in got] == [1, 2]
        assert [m.delivery_info["routing_key"] for m in got] == ["task.succeeded", "task"]
        q.close()
    assert rows(db, "SELECT routing_key FROM pgbroker.dead_letter") == [("worker.online",)]


def test_unbind(db_url: str, db: psycopg.Connection) -> None:
    ex = Exchange("ex", type="direct")
    with connect(db_url) as conn:
        declare(conn, ex, {"q": "k"})
        conn.default_channel.queue_unbind("q", "ex", "k")
        assert scalar(db, "SELECT count(*) FROM pgbroker.binding") == 0
        Producer(conn.default_channel).publish("x", exchange="ex", routing_key="k")
    assert queued(db) == []
    assert scalar(db, "SELECT count(*) FROM pgbroker.dead_letter") == 1


def test_unroutable_persistent_is_dead_lettered_transient_dropped(
    db_url: str, db: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    ex = Exchange("nowhere", type="topic")
    with connect(db_url) as conn:
        ex(conn.default_channel).declare()
        producer = Producer(conn.default_channel, exchange=ex)
        with caplog.at_level(logging.WARNING, logger="pgbroker"):
            producer.publish(
                {"keep": True}, routing_key="a.b", headers={"id": "t-1", "task": "proj.add"}
            )
        assert any(
            "matched no queue" in r.getMessage() and "'a.b'" in r.getMessage()
            for r in caplog.records
        )
        producer.publish({"keep": False}, routing_key="a.c", delivery_mode=1)
    dead = rows(
        db,
        "SELECT reason, exchange, routing_key, task_id, task_name, queue,"
        " convert_from(body, 'utf8') FROM pgbroker.dead_letter",
    )
    assert dead == [("unroutable", "nowhere", "a.b", "t-1", "proj.add", None, '{"keep": true}')]
    assert scalar(db, "SELECT count(*) FROM pgbroker.message") == 0


def test_unroutable_to_a_non_durable_exchange_is_dropped(
    db_url: str, db: psycopg.Connection
) -> None:
    # Kombu's pidbox exchanges are non-durable; Celery's producer sends its
    # broadcasts persistent. With no worker listening, AMQP drops them, and
    # so does pgbroker: they are not worth a dead letter.
    ex = Exchange("app.pidbox", type="fanout", durable=False)
    with connect(db_url) as conn:
        ex(conn.default_channel).declare()
        Producer(conn.default_channel, exchange=ex).publish({"method": "ping"}, routing_key="")
    app = Celery("routing", broker=db_url, set_as_current=False)
    try:
        assert app.control.ping(timeout=0.5) == []  # no worker: nobody answers
    finally:
        app.close()
    assert scalar(db, "SELECT count(*) FROM pgbroker.dead_letter") == 0
    assert scalar(db, "SELECT count(*) FROM pgbroker.message") == 0


def test_exchange_declare_checks(db_url: str) -> None:
    with connect(db_url) as conn:
        channel = conn.default_channel
        channel.exchange_declare("typed", type="topic")
        channel.exchange_declare("typed", type="topic")  # same again: fine
        with pytest.raises(NotEquivalentError):
            channel.exchange_declare("typed", type="direct")
        with pytest.raises(ChannelError):
            channel.exchange_declare("hdr", type="headers")
        with pytest.raises(ChannelError):
            channel.exchange_declare("missing", passive=True)
        channel.exchange_declare("typed", passive=True)


def test_exchange_delete_removes_bindings(db_url: str, db: psycopg.Connection) -> None:
    ex = Exchange("doomed", type="fanout")
    with connect(db_url) as conn:
        declare(conn, ex, {"fq": ""})
        conn.default_channel.exchange_delete("doomed")
        assert scalar(db, "SELECT count(*) FROM pgbroker.exchange WHERE name = 'doomed'") == 0
        assert scalar(db, "SELECT count(*) FROM pgbroker.binding") == 0
        # The queue stays (AMQP); messages to the deleted exchange are unroutable.
        assert scalar(db, "SELECT count(*) FROM pgbroker.queue WHERE name = 'fq'") == 1
        Producer(conn.default_channel).publish("x", exchange="doomed", routing_key="")
    assert queued(db) == []
    assert scalar(db, "SELECT reason FROM pgbroker.dead_letter") == "unroutable"
