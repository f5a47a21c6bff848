"""Limits checked in Python before any SQL: a message's headers count
towards max_message_size, and queue, exchange and routing key names longer
than 255 bytes are refused with the limit in the message (PostgreSQL would
fail with a raw btree index error above about 2,700 bytes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from kombu import Connection, Exchange, Producer, Queue

from pgbroker.broker.channel import MAX_NAME_BYTES
from pgbroker.errors import MessageTooLarge, NameTooLong

LONG = "n" * (MAX_NAME_BYTES + 1)
LONG_UTF8 = "é" * (MAX_NAME_BYTES // 2 + 1)  # 256 bytes in 129 characters
MAX = "m" * MAX_NAME_BYTES


def _counts(db: psycopg.Connection) -> tuple[Any, ...]:
    row = db.execute(
        "SELECT (SELECT count(*) FROM pgbroker.queue), (SELECT count(*) FROM pgbroker.exchange),"
        " (SELECT count(*) FROM pgbroker.binding), (SELECT count(*) FROM pgbroker.message),"
        " (SELECT count(*) FROM pgbroker.dead_letter)"
    ).fetchone()
    assert row is not None
    return tuple(row)


def test_a_20_mb_header_is_refused(db_url: str, db: psycopg.Connection) -> None:
    with Connection(db_url) as conn:
        channel = conn.channel()
        queue = Queue("hq", Exchange("hx", type="direct"), routing_key="hk")
        queue(channel).declare()
        before = _counts(db)
        producer = Producer(channel, exchange=queue.exchange, routing_key="hk")
        with pytest.raises(MessageTooLarge) as info:
            producer.publish(b"x", headers={"big": "y" * 20_000_000}, retry=True)
        text = str(info.value)
        assert "(body 1, headers 20000011)" in text
        assert f"more than max_message_size={16 * 1024 * 1024}" in text
        assert _counts(db) == before


def test_headers_count_with_the_body(db_url: str, db: psycopg.Connection) -> None:
    with Connection(db_url, transport_options={"max_message_size": 1000}) as conn:
        channel = conn.channel()
        queue = Queue("hq", Exchange("hx", type="direct"), routing_key="hk")
        queue(channel).declare()
        producer = Producer(channel, exchange=queue.exchange, routing_key="hk")
        with pytest.raises(MessageTooLarge, match="1009 bytes"):
            producer.publish(b"x" * 500, headers={"h": "y" * 500}, content_type="a/b")
        # Exactly the limit (500 + len('{"h": "yyy..."}') = 1000) passes.
        producer.publish(b"x" * 500, headers={"h": "y" * 491}, content_type="a/b")
        assert db.execute("SELECT count(*) FROM pgbroker.message").fetchone() == (1,)


def _declare_queue(channel: Any, name: str) -> None:
    Queue(name, Exchange("lx", type="direct"), routing_key="lk")(channel).declare()


def _declare_exchange(channel: Any, name: str) -> None:
    Exchange(name, type="direct")(channel).declare()


def _bind(channel: Any, name: str) -> None:
    channel.queue_bind("lq", "lx", name)


def _publish(channel: Any, name: str) -> None:
    Producer(channel).publish(b"x", exchange="", routing_key=name, retry=True)


def _publish_to_exchange(channel: Any, name: str) -> None:
    Producer(channel).publish(b"x", exchange=name, routing_key="k")


def _consume(channel: Any, name: str) -> None:
    channel.basic_consume(name, no_ack=False, callback=lambda m: None, consumer_tag="t")


@pytest.mark.parametrize(
    ("kind", "action"),
    [
        ("queue", _declare_queue),
        ("exchange", _declare_exchange),
        ("routing key", _bind),
        ("routing key", _publish),
        ("exchange", _publish_to_exchange),
        ("queue", _consume),
    ],
)
@pytest.mark.parametrize("name", [LONG, LONG_UTF8, "x" * 3000])
def test_long_names_are_refused_up_front(
    db_url: str,
    db: psycopg.Connection,
    kind: str,
    action: Callable[[Any, str], None],
    name: str,
) -> None:
    with Connection(db_url) as conn:
        channel = conn.channel()
        _declare_queue(channel, "lq")  # what the actions declare besides the name
        before = _counts(db)
        with pytest.raises(NameTooLong) as info:
            action(channel, name)
        text = str(info.value)
        assert text.startswith(f"{kind} name of {len(name.encode())} bytes")
        assert "at most 255 bytes" in text
        assert _counts(db) == before
        # The channel still works.
        _declare_queue(channel, "ok")
        assert _counts(db)[0] == before[0] + 1


def test_names_of_255_bytes_work(db_url: str, db: psycopg.Connection) -> None:
    with Connection(db_url) as conn:
        channel = conn.channel()
        queue = Queue(MAX, Exchange(MAX, type="direct"), routing_key=MAX)
        queue(channel).declare()
        Producer(channel).publish({"n": 1}, exchange=MAX, routing_key=MAX)
        message = queue(channel).get(no_ack=True)
        assert message is not None
        assert message.payload == {"n": 1}
