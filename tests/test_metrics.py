"""Monitoring: the SQL views of migration 008 and the Prometheus exporter.

Messages are queued, claimed and rejected through Kombu, then the views,
``pgbroker status`` and a real scrape of the exporter's HTTP endpoint must
all report the same figures.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from pgbroker.errors import SchemaError
from pgbroker.operations import admin, metrics
from tests.kombu_helpers import FAST, collect, drain_until

prometheus_parser = pytest.importorskip("prometheus_client.parser")


@pytest.fixture
def busy(db_url: str, db: psycopg.Connection) -> Iterator[Connection]:
    """work: 5 published, 2 claimed (held unacked), 1 of the others rejected
    to dead_letter; other: 3 published, 1 made delayed. The consumer's
    connection stays open, so it is alive."""
    conn = Connection(db_url, transport_options=FAST)
    conn.connect()
    try:
        exchange = Exchange("ex", type="direct")
        work = Queue("work", exchange, routing_key="work")
        other = Queue("other", exchange, routing_key="other")
        producer = Producer(conn.channel(), exchange=exchange)
        for q in (work, other):
            q(producer.channel).declare()
        for i in range(5):
            producer.publish({"i": i}, routing_key="work")
        for i in range(3):
            producer.publish({"i": i}, routing_key="other")
        received: list[Any] = []
        channel = conn.channel()
        channel.basic_qos(0, 3, False)
        consumer = Consumer(channel, [work], callbacks=[collect(received)])
        consumer.consume()
        drain_until(conn, lambda: len(received) >= 3)
        received[0].reject(requeue=False)  # -> dead_letter, reason 'rejected'
        # The reject is written when the delivery batch ends; wait for it.
        _wait(lambda: db.execute("SELECT count(*) FROM pgbroker.dead_letter").fetchone() == (1,))
        db.execute(
            "UPDATE pgbroker.message SET state = 'delayed', visible_at = now() + interval '1h'"
            " WHERE id = (SELECT min(id) FROM pgbroker.message WHERE queue = 'other')"
        )
        yield conn
    finally:
        conn.release()


def _wait(check: Any, timeout: float = 15.0) -> None:
    from tests.kombu_helpers import wait_for

    wait_for(check, timeout)


def _values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def _get(values: dict[Any, float], name: str, **labels: str) -> float:
    return values[(name, tuple(sorted(labels.items())))]


def test_views_match_status(busy: Connection, db_url: str, db: psycopg.Connection) -> None:
    with admin.open_connection(db_url, "pgbroker") as conn:
        status = admin.status(conn, "pgbroker", all_queues=True)
    view = {
        r[0]: r[1:]
        for r in db.execute(
            "SELECT queue, ready, reserved, delayed, dead_letters, consumers, declared"
            " FROM pgbroker.queue_stats"
        )
    }
    assert view == {
        q.name: (q.ready, q.reserved, q.delayed, q.dead_lettered, q.consumers, q.declared)
        for q in status.queues
    }
    assert view["work"] == (2, 2, 0, 1, 1, True)
    assert view["other"] == (2, 0, 1, 0, 0, True)
    broker = db.execute("SELECT * FROM pgbroker.broker_stats").fetchone()
    assert broker is not None
    description = db.execute("SELECT * FROM pgbroker.broker_stats LIMIT 0").description
    assert description is not None
    names = [d.name for d in description]
    stats = dict(zip(names, broker, strict=True))
    assert stats["consumers_alive"] == len([c for c in status.consumers if c.alive]) == 1
    assert stats["messages_stored_total"] == status.activity.messages_stored_total == 8
    assert stats["messages_present"] == status.activity.messages_present == 7
    assert stats["messages_removed_total"] == 1
    assert stats["dead_lettered_total"] == stats["dead_letters"] == 1


@contextlib.contextmanager
def _exporter(db_url: str, **kwargs: Any) -> Iterator[str]:
    server, collector = metrics.serve(db_url, "pgbroker", port=0, addr="127.0.0.1", **kwargs)
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        collector.close()


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return str(response.read().decode())


def test_scrape_reports_queued_messages(
    busy: Connection, db_url: str, db: psycopg.Connection
) -> None:
    with _exporter(db_url) as url:
        values = _values(_scrape(url))
    assert _get(values, "pgbroker_up") == 1
    expected = {
        ("work", "ready"): 2,
        ("work", "reserved"): 2,
        ("work", "delayed"): 0,
        ("other", "ready"): 2,
        ("other", "reserved"): 0,
        ("other", "delayed"): 1,
    }
    for (queue, state), n in expected.items():
        assert _get(values, "pgbroker_queue_messages", queue=queue, state=state) == n
    assert _get(values, "pgbroker_queue_dead_letters", queue="work") == 1
    assert _get(values, "pgbroker_queue_consumers", queue="work") == 1
    assert _get(values, "pgbroker_consumers", state="alive") == 1
    assert _get(values, "pgbroker_messages_stored_total") == 8
    assert _get(values, "pgbroker_messages_removed_total") == 1
    assert _get(values, "pgbroker_dead_lettered_total") == 1
    assert _get(values, "pgbroker_dead_letters") == 1
    assert _get(values, "pgbroker_redeliveries_total") == 0
    # Latency: the oldest ready message's age, as the database sees it.
    age = _get(values, "pgbroker_queue_oldest_ready_age_seconds", queue="work")
    row = db.execute(
        "SELECT extract(epoch FROM now() - min(published_at))::float8 FROM pgbroker.message"
        " WHERE queue = 'work' AND state = 'ready'"
    ).fetchone()
    assert row is not None and 0 < age <= row[0]
    assert _get(values, "pgbroker_table_size_bytes", table="message") > 0
    # Celery's internal queues are left out unless asked for.
    assert not any("pidbox" in str(labels) for _, labels in values)


def test_counters_follow_acks_and_redeliveries(db_url: str, db: psycopg.Connection) -> None:
    with Connection(db_url, transport_options=FAST) as conn:
        queue = Queue("q")
        producer = Producer(conn.channel())
        queue(producer.channel).declare()
        for i in range(10):
            producer.publish({"i": i}, routing_key="q")
        received: list[Any] = []
        consumer = Consumer(conn.channel(), [queue], callbacks=[collect(received)])
        consumer.consume()
        drain_until(conn, lambda: len(received) >= 10)
        for m in received[:6]:
            m.ack()
    # Closing the connection put the four unacked messages back; whether
    # that is logged as a redelivery is the transport's business. Log one
    # crash recovery by hand and watch the counter.
    with admin.open_connection(db_url, "pgbroker") as conn:
        before = metrics.snapshot(conn, "pgbroker").broker["redeliveries_total"]
    db.execute(
        "INSERT INTO pgbroker.redelivery (reason, message_id, queue, delivery_count)"
        " VALUES ('consumer died', 1, 'q', 1)"
    )
    with admin.open_connection(db_url, "pgbroker") as conn:
        snap = metrics.snapshot(conn, "pgbroker")
    assert snap.broker["messages_stored_total"] == 10
    assert snap.broker["messages_removed_total"] == 6
    assert snap.broker["redeliveries_total"] == before + 1
    # Pruning the log does not lower the counter.
    db.execute("DELETE FROM pgbroker.redelivery")
    with admin.open_connection(db_url, "pgbroker") as conn:
        assert metrics.snapshot(conn, "pgbroker").broker["redeliveries_total"] == before + 1
    [q] = snap.queues
    assert (q.queue, q.ready, q.reserved) == ("q", 4, 0)


def test_results_completed(db_url: str, db: psycopg.Connection) -> None:
    db.execute(
        "INSERT INTO pgbroker.task_result (task_id, state, content_type, content_encoding,"
        " date_done) SELECT 't' || i, CASE WHEN i % 3 = 0 THEN 'FAILURE' ELSE 'SUCCESS' END,"
        " 'application/json', 'utf-8', now() - make_interval(mins => i)"
        " FROM generate_series(0, 29) i"
    )
    with admin.open_connection(db_url, "pgbroker") as conn:
        snap = metrics.snapshot(conn, "pgbroker")
        status = admin.status(conn, "pgbroker")
    assert status.activity.results is not None
    assert snap.results["SUCCESS"]["last_hour"] == 20
    assert snap.results["FAILURE"]["last_hour"] == 10
    assert snap.results["SUCCESS"]["last_5_minutes"] == 3  # i = 1, 2, 4
    assert {s: r["last_hour"] for s, r in snap.results.items()} == (
        status.activity.results.by_state_last_hour
    )
    values = _values(metrics.render(snap).decode())
    assert _get(values, "pgbroker_task_results_completed", state="FAILURE", window="1h") == 10


def test_each_scrape_is_one_query(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    collector = metrics.Collector(db_url, "pgbroker")
    try:
        assert collector.read() is not None  # connects (and checks the schema)
        own = collector._conn
        assert own is not None
        statements: list[Any] = []
        real = psycopg.Connection.execute

        def counted(self: psycopg.Connection, query: Any, *args: Any, **kwargs: Any) -> Any:
            # Only the collector's own session: other threads of the process
            # (e.g. a result backend's expiry) may run statements meanwhile.
            if self is own:
                statements.append(query)
            return real(self, query, *args, **kwargs)

        monkeypatch.setattr(psycopg.Connection, "execute", counted)
        for _ in range(3):
            assert collector.read() is not None
        assert collector._conn is own  # no reconnect between the scrapes
        assert len(statements) == 3
    finally:
        collector.close()


def test_unreachable_database_reports_down() -> None:
    collector = metrics.Collector("postgresql://nobody:secret@127.0.0.1:1/none", "pgbroker")
    text = metrics.render(collector.read())
    assert _get(_values(text.decode()), "pgbroker_up") == 0
    assert b"secret" not in text


def test_schema_without_views_says_migrate(db_url: str, db: psycopg.Connection) -> None:
    db.execute("DROP VIEW pgbroker.queue_stats")
    with admin.open_connection(db_url, "pgbroker") as conn, pytest.raises(SchemaError) as info:
        metrics.snapshot(conn, "pgbroker")
    assert "pgbroker migrate" in str(info.value)


def test_views_work_with_an_odd_schema_name(empty_db_url: str) -> None:
    from pgbroker.database import schema
    from pgbroker.database.sessions import connect

    name = "we\"ird's"
    with connect(empty_db_url) as conn:
        schema.migrate(conn, name)
        snap = metrics.snapshot(conn, name)
    assert snap.broker["consumers_alive"] == 0
    assert "message" in snap.tables


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pgbroker", *args]


def test_cli_metrics_serves_http(busy: Connection, db_url: str) -> None:
    with subprocess.Popen(
        _cli("metrics", "--url", db_url, "--port", "0", "--addr", "127.0.0.1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PGBROKER_URL": ""},
    ) as proc:  # closes the stderr pipe
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            match = re.search(r"serving (http://\S+/metrics)", line)
            assert match, line
            values = _values(_scrape(match.group(1)))
            assert _get(values, "pgbroker_queue_messages", queue="work", state="ready") == 2
        finally:
            proc.terminate()
            proc.wait(15)


def test_cli_metrics_once(busy: Connection, db_url: str) -> None:
    out = subprocess.run(
        _cli("metrics", "--url", db_url, "--once", "--all-queues"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    values = _values(out)
    assert _get(values, "pgbroker_queue_messages", queue="other", state="delayed") == 1
