"""Consume rate with a deep backlog, for :mod:`compat.bench` (pgbroker only).

A queue holds ``backlog`` ready messages (one million at full size). A Kombu
consumer (prefetch as in the consume figure, acking each message) takes
``count`` of them; the same consumer code takes ``count`` messages from a
queue that holds only those (the empty-queue rate). Rounds alternate the
two, in the same database, so both see the same server and the same noise.

The backlog is written by SQL, not by a million publishes (which would take
minutes): one message is published through Kombu, and ``INSERT ... SELECT``
copies its row, so every copy is exactly what a publish stores. The table is
then ``ANALYZE``d, as autovacuum would do after such a load. Redis and
RabbitMQ are not measured here: filling them needs a million publishes.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
from kombu import Connection, Consumer, Exchange, Producer, Queue
from psycopg import sql

#: The columns a publish writes (pgbroker/sql/queries.sql, ``publish``).
COPIED = (
    "queue", "priority", "expires_at", "exchange", "routing_key", "task_id", "task_name",
    "content_type", "content_encoding", "headers", "properties", "body",
)  # fmt: skip


def fill(
    url: str, exchange: Exchange, queue: Queue, n: int, body: Any, chunk: int = 100_000
) -> None:
    """Put ``n`` ready messages in ``queue``: one published, ``n - 1`` copies."""
    with Connection(url) as conn:
        channel = conn.channel()
        queue(channel).declare()
        Producer(channel, exchange=exchange, auto_declare=False).publish(
            body, routing_key=queue.routing_key, delivery_mode=2, serializer="json"
        )
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in COPIED)
    copy = sql.SQL(
        "INSERT INTO pgbroker.message ({cols}) "
        "SELECT {cols} FROM pgbroker.message m CROSS JOIN generate_series(1, %s) "
        "WHERE m.id = (SELECT max(id) FROM pgbroker.message WHERE queue = %s)"
    ).format(cols=columns)
    with psycopg.connect(url, autocommit=True) as pg:
        left = n - 1
        while left > 0:  # in chunks: bounded transactions on a shared server
            step = min(chunk, left)
            pg.execute(copy, [step, queue.name])
            left -= step
        pg.execute("ANALYZE pgbroker.message")


def consume(url: str, queue: Queue, count: int, prefetch: int, timeout: float = 60.0) -> float:
    """Messages per second for one consumer taking and acking ``count``."""
    got = 0

    def on_message(body: Any, message: Any) -> None:
        nonlocal got
        message.ack()
        got += 1

    with Connection(url) as conn:
        consumer = Consumer(
            conn.channel(), [queue], callbacks=[on_message], prefetch_count=prefetch,
            auto_declare=False,
        )  # fmt: skip
        start = time.perf_counter()
        with consumer:
            while got < count:
                try:
                    conn.drain_events(timeout=timeout)
                except TimeoutError as exc:
                    raise RuntimeError(f"backlog: nothing received for {timeout:.0f} s") from exc
        return count / (time.perf_counter() - start)


def ready_count(url: str, queue: str) -> int:
    with psycopg.connect(url, autocommit=True) as pg:
        row = pg.execute(
            "SELECT count(*) FROM pgbroker.message WHERE queue = %s AND state = 'ready'", [queue]
        ).fetchone()
        return int(row[0]) if row else 0
