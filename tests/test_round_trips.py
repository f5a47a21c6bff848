"""Round trips on the hot paths, counted at the transport's query layer.

Each named query the transport runs is one round trip to PostgreSQL, so
counting them catches a regression that adds per-message work.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import psycopg
import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from tests.kombu_helpers import drain_until


def _count_queries(conn: Connection, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    counts: Counter[str] = Counter()
    transport = conn.transport
    for method in ("run", "run_all", "run_count"):
        real = getattr(transport, method)

        def counted(query: str, /, _real: Any = real, **params: Any) -> Any:
            counts[query] += 1
            return _real(query, **params)

        monkeypatch.setattr(transport, method, counted)
    return counts


def test_publish_is_one_statement_per_message(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with Connection(db_url) as conn:
        exchange = Exchange("ex", type="direct")
        queue = Queue("q", exchange, routing_key="k")
        producer = Producer(conn.channel(), exchange=exchange)
        queue(producer.channel).declare()
        producer.publish({"first": True}, routing_key="k")  # declares the exchange
        counts = _count_queries(conn, monkeypatch)
        for i in range(50):
            producer.publish({"i": i}, routing_key="k")
        assert counts == Counter({"publish": 50})


def test_consume_claims_and_acks_in_batches(
    db_url: str, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 messages with prefetch 50: about 4 claims and 4 ack statements,
    not 200 of each."""
    with Connection(db_url) as conn:
        queue = Queue("q")
        producer = Producer(conn.channel())
        queue(producer.channel).declare()
        for i in range(200):
            producer.publish({"i": i}, routing_key="q")
        consumer_channel = conn.channel()
        consumer_channel.basic_qos(0, 50, False)
        got: list[int] = []

        def on_message(body: Any, message: Any) -> None:
            got.append(body["i"])
            message.ack()

        with Consumer(consumer_channel, [queue], callbacks=[on_message]):
            counts = _count_queries(conn, monkeypatch)
            drain_until(conn, lambda: len(got) == 200)
        assert sorted(got) == list(range(200))
        assert counts["claim"] <= 6, counts
        assert counts["ack"] <= 6, counts
    assert db.execute("SELECT count(*) FROM pgbroker.message").fetchone() == (0,)


def test_ensure_connection_after_a_lost_session_resumes_consuming(
    db_url: str, db: psycopg.Connection
) -> None:
    """Kombu's ensure_connection() on the same Connection (no collect())
    reconnects, and the consumer goes on as a new consumer."""
    with Connection(db_url, transport_options={"sweep_interval": 0.2}) as conn:
        queue = Queue("q")
        channel = conn.channel()
        queue(channel).declare()
        producer = Producer(channel)
        got: list[int] = []

        def on_message(body: Any, message: Any) -> None:
            got.append(body["i"])
            message.ack()

        with Consumer(channel, [queue], callbacks=[on_message]):
            producer.publish({"i": 0}, routing_key="q")
            drain_until(conn, lambda: got == [0])
            pid = conn.transport.conn.info.backend_pid
            db.execute("SELECT pg_terminate_backend(%s)", [pid])
            with pytest.raises(conn.connection_errors):
                conn.drain_events(timeout=2)
            conn.ensure_connection(max_retries=3)
            assert conn.transport.conn.info.backend_pid != pid
            Producer(conn.channel()).publish({"i": 1}, routing_key="q")
            drain_until(conn, lambda: got == [0, 1])
