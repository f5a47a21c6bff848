"""Query plans: the hot statements use their indexes on a large table.

The claim must walk the ``message_ready`` partial index in service order
(no Seq Scan, no Sort), whether PostgreSQL plans it with the actual
parameters or as a generic prepared statement (psycopg prepares a statement
after a few executions, and PostgreSQL may then switch to a generic plan).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from kombu import Connection, Producer, Queue
from kombu import Consumer as KombuConsumer
from psycopg import pq
from psycopg._queries import PostgresQuery
from psycopg.adapt import Transformer

from pgbroker.broker.transport import _PIPELINED
from pgbroker.database import queries
from pgbroker.database.pipeline import numbered
from tests.kombu_helpers import drain_until

Q = queries.for_schema("pgbroker")
QUEUES = ["q0", "q1", "q2", "q3", "q4"]


@pytest.fixture
def big(db: psycopg.Connection) -> psycopg.Connection:
    """~50k ready rows in five queues, plus reserved and expiring rows."""
    db.execute("INSERT INTO pgbroker.queue (name) SELECT unnest(%s::text[])", [QUEUES])
    db.execute("INSERT INTO pgbroker.consumer (hostname, pid) VALUES ('h', 1), ('h', 2)")
    db.execute(
        """
        INSERT INTO pgbroker.message (queue, priority, exchange, routing_key, headers,
                                      properties, body)
        SELECT 'q' || (i % 5), i % 10, '', 'q' || (i % 5), '{}', '{}', '\\x00'
        FROM generate_series(1, 50000) i
        """
    )
    db.execute(
        """
        INSERT INTO pgbroker.message (queue, state, consumer_id, exchange, routing_key,
                                      headers, properties, body)
        SELECT 'q' || (i % 5), 'reserved', 1 + i % 2, '', '', '{}', '{}', '\\x00'
        FROM generate_series(1, 20000) i
        """
    )
    db.execute(
        """
        INSERT INTO pgbroker.message (queue, expires_at, exchange, routing_key, headers,
                                      properties, body)
        SELECT 'q1', now() + interval '1 hour', '', '', '{}', '{}', '\\x00'
        FROM generate_series(1, 500) i
        """
    )
    db.execute("ANALYZE pgbroker.message")
    db.execute("ANALYZE pgbroker.queue")
    return db


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def explain(db: psycopg.Connection, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    row = db.execute(b"EXPLAIN (FORMAT JSON) " + Q[name].as_bytes(db), params).fetchone()
    assert row is not None
    return list(nodes(row[0][0]["Plan"]))


def explain_generic(
    db: psycopg.Connection, name: str, params: dict[str, Any]
) -> list[dict[str, Any]]:
    """The generic plan of the statement prepared exactly as psycopg prepares
    it for the transport (same $n placeholders and parameter types)."""
    converted = PostgresQuery(Transformer(db))
    converted.convert(Q[name], params)
    db.execute("SET plan_cache_mode = force_generic_plan")
    try:
        result = db.pgconn.prepare(b"generic", converted.query, converted.types)
        assert result.status == pq.ExecStatus.COMMAND_OK, result.get_error_message()
        # EXECUTE takes no bind parameters: pass the values as literals.
        args = psycopg.sql.SQL(", ").join(
            psycopg.sql.Literal(params[key]) for key in converted._order or []
        )
        query = psycopg.sql.SQL("EXPLAIN (FORMAT JSON) EXECUTE generic({})").format(args)
        row = db.execute(query).fetchone()
    finally:
        db.execute("DEALLOCATE generic")
        db.execute("RESET plan_cache_mode")
    assert row is not None
    return list(nodes(row[0][0]["Plan"]))


def scans_of(plan: list[dict[str, Any]], relation: str) -> list[tuple[str, str | None]]:
    return [
        (n["Node Type"], n.get("Index Name"))
        for n in plan
        if n.get("Relation Name") == relation and "Scan" in n["Node Type"]
    ]


# From the start of the queue (pgbroker.broker.cursor.WHOLE_QUEUE).
CLAIM = {
    "queue": "q3",
    "limit": 10,
    "consumer_id": 1,
    "acks": [1, 2],
    "from_priority": 10,
    "from_id": 0,
    "wake_min": 1,
}


@pytest.mark.parametrize("how", [explain, explain_generic])
def test_claim_walks_the_ready_index(big: psycopg.Connection, how: Any) -> None:
    plan = how(big, "claim", CLAIM)
    scans = scans_of(plan, "message")
    assert ("Index Scan", "message_ready") in scans, scans
    assert not [s for s in scans if s[0] == "Seq Scan"], scans
    assert not [n for n in plan if n["Node Type"] in ("Sort", "Incremental Sort")], plan
    # The ready-index scan is bounded by the limit, not the queue's length.
    assert any(n["Node Type"] == "Limit" for n in plan)


@pytest.mark.parametrize("how", [explain, explain_generic])
def test_claim_no_ack_walks_the_ready_index(big: psycopg.Connection, how: Any) -> None:
    plan = how(big, "claim_no_ack", {"queue": "q3", "limit": 10})
    scans = scans_of(plan, "message")
    assert ("Index Scan", "message_ready") in scans, scans
    assert not [s for s in scans if s[0] == "Seq Scan"], scans
    assert not [n for n in plan if n["Node Type"] in ("Sort", "Incremental Sort")], plan


def test_claim_really_claims_in_order(big: psycopg.Connection) -> None:
    got = big.execute(Q["claim"], CLAIM).fetchall()
    assert len(got) == 10
    assert sorted((-r[1], r[0]) for r in got) == [
        tuple(x)
        for x in big.execute(
            "SELECT -priority, id FROM pgbroker.message WHERE queue = 'q3' AND state = 'reserved'"
            " AND consumer_id = 1 AND claimed_at IS NOT NULL ORDER BY priority DESC, id"
        ).fetchall()
    ]
    assert {r[1] for r in got} == {8}  # q3 holds priorities 3 and 8


def test_a_claim_from_a_position_takes_what_follows_it_in_order(big: psycopg.Connection) -> None:
    """From (priority, id): the rest of that priority from the id, then the
    lower priorities; nothing before the position (pgbroker.broker.cursor)."""

    def ready(priority: int) -> list[int]:
        return [
            r[0]
            for r in big.execute(
                "SELECT id FROM pgbroker.message WHERE queue = 'q3' AND state = 'ready'"
                " AND priority = %s ORDER BY id",
                [priority],
            )
        ]

    def claim(priority: int, message_id: int, limit: int) -> list[tuple[int, int]]:
        params = {**CLAIM, "limit": limit, "from_priority": priority, "from_id": message_id}
        return sorted((r[1], r[0]) for r in big.execute(Q["claim"], params).fetchall())

    high, low = ready(8), ready(3)
    middle = high[len(high) // 2]
    # Within the position's priority, from its id on.
    assert claim(8, middle, 10) == [(8, i) for i in high[len(high) // 2 :][:10]]
    # The end of that priority reached: the lower ones follow.
    last = high[-3:]
    assert claim(8, last[0], 5) == [(3, i) for i in low[:2]] + [(8, i) for i in last]
    # Nothing above the position's priority, nor before its id.
    assert claim(3, low[-1], 10) == [(3, low[-1])]
    # After the lowest priority: nothing (pgbroker.broker.cursor.END).
    assert claim(-1, 0, 10) == []
    # The whole queue: what is left of the highest priority first.
    assert claim(10, 0, 3) == [(8, i) for i in high[:3]]


@pytest.fixture
def one_queue(db: psycopg.Connection) -> psycopg.Connection:
    """The common shape: every message in one queue, at one priority, all
    ready (a Celery app's default queue; the scale benchmark's table)."""
    db.execute("INSERT INTO pgbroker.queue (name) VALUES ('only')")
    db.execute(
        """
        INSERT INTO pgbroker.message (queue, exchange, routing_key, headers, properties, body)
        SELECT 'only', '', 'only', '{}', '{}', '\\x00' FROM generate_series(1, 6400)
        """
    )
    db.execute("ANALYZE pgbroker.message")
    return db


@pytest.mark.parametrize("how", [explain, explain_generic])
@pytest.mark.parametrize("start", [(10, 0), (0, 3000)], ids=["whole-queue", "position"])
def test_claim_scans_only_the_ready_index_on_one_queue(
    one_queue: psycopg.Connection, how: Any, start: tuple[int, int]
) -> None:
    """With one queue and one priority the planner judged a walk of the
    primary key from the position (id >= from_id, filtered) as cheap as the
    ready index. That walk reads every row version after the position, of
    every queue, claimed or dead: at 64 consumers on one queue it read 2.5
    times the entries of the ready index (compat/bench_scale.py)."""
    params = {**CLAIM, "queue": "only", "from_priority": start[0],
              "from_id": start[1]}  # fmt: skip
    scans = [
        (n["Index Name"], n.get("Index Cond", ""))
        for n in how(one_queue, "claim", params)
        if n.get("Relation Name") == "message" and "Scan" in n["Node Type"]
    ]
    # The acks and the claimed rows by id; every search by position: the ready index.
    searches = [s for s in scans if "= ANY" not in s[1]]
    assert searches and all(index == "message_ready" for index, _ in searches), scans


PUBLISH = {
    "exchange": "",
    "routing_key": "q2",
    "priority": 0,
    "ttl": None,
    "persistent": True,
    "task_id": None,
    "task_name": None,
    "content_type": "application/json",
    "content_encoding": "utf-8",
    "headers": "{}",
    "properties": "{}",
    "body": b"{}",
    "channel": "pgbroker",
    "due_channel": "pgbd_x",
    "wake_one": True,
    "dedup": False,
    "retries": 0,
    "source": None,
    "eta": None,
    "expires": None,
    # No cached route (publish_routing routes in SQL; test_routing_cache.py).
    "version": None,
    "queues": [],
    "ttls": [],
}


@pytest.mark.parametrize("how", [explain, explain_generic])
def test_publish_does_not_scan_messages(big: psycopg.Connection, how: Any) -> None:
    for exchange in ("", "amq.topic"):
        for statement, route in (("publish", ["q1"]), ("publish_routing", [])):
            params = {**PUBLISH, "exchange": exchange, "queues": route, "ttls": [None] * len(route)}
            plan = how(big, statement, params)
            assert not [s for s in scans_of(plan, "message") if s[0] == "Seq Scan"]


SWEEP = {
    "lock_oid": 0,
    "channel": "pgbroker",
    "schema_name": "pgbroker",
    "max_deliveries": 10,
    "queues": ["q1", "q3"],
    "promote_limit": 1000,
    "dedup_window": 604800.0,
    "prune_limit": 5000,
    "housekeep_limit": 2000,
    "own_host": "h",
    "own_pid": 1,
}


def test_statements_on_one_queue_use_indexes(big: psycopg.Connection) -> None:
    """Size, purge, ack, requeue, reject, delete and the sweep never read the
    whole message table."""
    cases: dict[str, dict[str, Any]] = {
        "size": {"queue": "q1"},
        "purge": {"queue": "q1"},
        "delete_queue": {"name": "q1"},
        "ack": {"ids": [1, 2, 3], "consumer_id": 1},
        "requeue": {
            "ids": [1, 2, 3],
            "consumer_id": 1,
            "channel": "pgbroker",
            "counted": True,
            "max_deliveries": 10,
            "reason": "requeued",
            "schema_name": "pgbroker",
        },
        "reject": {"ids": [1, 2, 3], "consumer_id": 1},
        "unclaim": {"ids": [1, 2, 3], "consumer_id": 1, "channel": "pgbroker"},
        "unregister_consumer": {"consumer_id": 1, "channel": "pgbroker", "lock_class": 0},
        "sweep": SWEEP,
        "declare_queue": {
            "name": "q1",
            "durable": True,
            "auto_delete": False,
            "message_ttl": None,
            "expires": None,
            "arguments": None,
            "exclusive_to": None,
        },
        "drop_unused_queues": {"queue": "q1"},
    }
    for name, params in cases.items():
        for how in (explain, explain_generic):
            plan = how(big, name, params)
            seq = [s for s in scans_of(plan, "message") if s[0] == "Seq Scan"]
            assert not seq, (name, how.__name__, scans_of(plan, "message"))
    # After a close or a sweep: every queue, but no message scanned.
    for how in (explain, explain_generic):
        plan = how(big, "drop_unused_queues", {"queue": None})
        assert not [s for s in scans_of(plan, "message") if s[0] == "Seq Scan"], how.__name__


def test_the_claim_and_its_acks_use_the_primary_key(big: psycopg.Connection) -> None:
    """The acks that ride with a claim are found by id, not by a scan."""
    for how in (explain, explain_generic):
        plan = how(big, "claim", {**CLAIM, "acks": list(range(1, 40))})
        scans = scans_of(plan, "message")
        assert not [s for s in scans if s[0] == "Seq Scan"], scans
        assert [s for s in scans if s[1] == "message_pkey"], scans


def test_a_new_queue_table_is_not_scanned(db_url: str) -> None:
    """On a new database the message table is small and has no statistics:
    the planner would judge a sequential scan cheapest for the claim and the
    ack, and keep that plan for the session's life while the table fills
    with dead rows. The transport's session plans them on their indexes
    (pgbroker.database.sessions.plan_for_queue_tables): asked on that session, after consuming."""
    with Connection(db_url) as conn:
        queue = Queue("fresh")
        producer = Producer(conn.channel())
        queue(producer.channel).declare()
        for i in range(60):
            producer.publish({"i": i}, routing_key="fresh")
        channel = conn.channel()
        channel.basic_qos(0, 5, False)
        got: list[int] = []

        def on_message(body: Any, message: Any) -> None:
            got.append(body["i"])
            message.ack()

        with KombuConsumer(channel, [queue], callbacks=[on_message]):
            drain_until(conn, lambda: len(got) == 60)
        transport = conn.transport
        session = transport.conn
        # The claim as the transport prepared it (its cached plan), and the ack.
        claim_name = _PIPELINED["claim"][0].decode()
        _, names = numbered(transport._sql["claim"])
        values = {
            "queue": "'fresh'",
            "limit": "5",
            "consumer_id": str(transport.consumer_id),
            "from_priority": "10",
            "from_id": "0",
            "wake_min": "1",
        }
        args = ", ".join(values.get(n, "'{1,2}'") for n in names)
        plans = [
            session.execute(f"EXPLAIN (FORMAT JSON) EXECUTE {claim_name}({args})").fetchone(),
            session.execute(
                b"EXPLAIN (FORMAT JSON) " + Q["ack"].as_bytes(session),
                {"ids": [1, 2], "consumer_id": transport.consumer_id},
            ).fetchone(),
        ]
    for row in plans:
        assert row is not None
        scans = scans_of(list(nodes(row[0][0]["Plan"])), "message")
        assert scans and not [s for s in scans if s[0] == "Seq Scan"], scans
