"""The claim hands its messages over before its commit completes.

A claim is one round trip: the claiming statement, a Flush (the server
sends the rows at once) and a Sync (the commit), whose reply the consumer
reads later, before its next statement. These tests keep that shape, its
guarantees (the rows stay locked until the commit, which completes before
anything else runs on the session) and its query plan.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from kombu import Connection, Consumer, Message, Producer, Queue
from psycopg import pq

from pgbroker.broker.transport import _PIPELINED
from pgbroker.database import pipeline, queries
from pgbroker.database.pipeline import numbered
from tests.kombu_helpers import connect, drain_until
from tests.test_claim_plan import big, nodes, scans_of  # noqa: F401  (fixture)

Q = queries.for_schema("pgbroker")


def publish(url: str, queue: Queue, n: int) -> None:
    with Connection(url) as conn:
        producer = Producer(conn.channel())
        for i in range(n):
            producer.publish({"i": i}, routing_key=queue.name, declare=[queue])


def test_callback_runs_while_the_claim_commits(db_url: str, db: psycopg.Connection) -> None:
    """In the callback the claim may not be committed yet, but the message is
    locked: no other consumer can claim it. Once drain_events returns, the
    claim is committed."""
    queue = Queue("pipelined")
    publish(db_url, queue, 1)
    seen: list[tuple[Any, ...]] = []
    with connect(db_url) as conn:

        def on_message(body: Any, message: Message) -> None:
            # Another session: the row is still 'ready' (uncommitted claim)
            # or already 'reserved', and in either case it cannot be taken.
            takeable = db.execute(
                "SELECT id FROM pgbroker.message WHERE state = 'ready' FOR UPDATE SKIP LOCKED"
            ).fetchall()
            seen.append((conn.transport._commit_pending, takeable))
            message.ack()

        with Consumer(conn, [queue], callbacks=[on_message]):
            drain_until(conn, lambda: bool(seen))
            assert not conn.transport._commit_pending
    commit_pending, takeable = seen[0]
    assert commit_pending  # the callback ran before the claim's commit was read
    assert takeable == []  # locked by the claiming transaction, or reserved
    assert db.execute("SELECT count(*) FROM pgbroker.message").fetchone() == (0,)


def test_claim_is_one_round_trip_with_the_commit_after_the_rows(db_url: str) -> None:
    """The claim's commit is read later, not waited for: after the claim
    returns its rows, the session has one reply (the Sync's) still to read,
    and the next statement reads it first."""
    queue = Queue("one-trip")
    publish(db_url, queue, 3)
    with connect(db_url) as conn:
        channel = conn.channel()
        queue(channel).declare()
        t = conn.transport
        rows = t.claim("one-trip", 2, no_ack=False, settle=False)
        assert len(rows) == 2
        assert t._commit_pending
        assert t.conn.pgconn.pipeline_status == pq.PipelineStatus.OFF  # t.conn settled it
        assert not t._commit_pending
        # A claim outside claim_and_deliver (basic_get) settles before returning.
        assert len(t.claim("one-trip", 5, no_ack=False)) == 1
        assert not t._commit_pending
        t.requeue([r[0] for r in rows])


def test_notification_behind_the_commit_reply_is_read(db_url: str) -> None:
    """A NOTIFY that arrives after the claim's commit reply is dispatched by
    read_notifies, which takes the reply without waiting for it."""
    a, b = Queue("notified-a"), Queue("notified-b")
    publish(db_url, a, 1)
    with connect(db_url) as conn:
        t = conn.transport
        channel = conn.channel()
        b(channel).declare()
        t.attach("notified-b")
        t._ready.discard("notified-b")
        rows = t.claim("notified-a", 1, no_ack=False, settle=False)
        assert len(rows) == 1 and t._commit_pending
        publish(db_url, b, 1)  # its NOTIFY reaches us after the commit's reply
        deadline = time.monotonic() + 5
        while "notified-b" not in t._ready:
            assert time.monotonic() < deadline, "the NOTIFY was lost"
            time.sleep(0.05)
            t.read_notifies()
        assert not t._commit_pending


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
def test_prepared_claim_walks_the_ready_index(
    big: psycopg.Connection,  # noqa: F811
    plan_cache_mode: str,
) -> None:
    """The claim as the transport prepares it (its $n parameters and their
    declared types), planned custom or generic, uses message_ready with
    neither a sequential scan nor a sort."""
    _, types = _PIPELINED["claim"]
    text, names = numbered(Q["claim"].as_bytes(big))
    res = big.pgconn.prepare(b"claim_plan", text, [types[n] for n in names])
    assert res.status == pq.ExecStatus.COMMAND_OK, res.get_error_message()
    values = {
        "queue": "'q3'",
        "limit": "10",
        "consumer_id": "1",
        "acks": "'{1,2}'",
        "from_priority": "8",
        "from_id": "1000",
        "wake_min": "1",
    }
    big.execute(f"SET plan_cache_mode = {plan_cache_mode}")
    try:
        args = ", ".join(values[n] for n in names)
        row = big.execute(f"EXPLAIN (FORMAT JSON) EXECUTE claim_plan({args})").fetchone()
    finally:
        big.execute("DEALLOCATE claim_plan")
        big.execute("RESET plan_cache_mode")
    assert row is not None
    plan = list(nodes(row[0][0]["Plan"]))
    scans = scans_of(plan, "message")
    assert ("Index Scan", "message_ready") in scans, scans
    assert not [s for s in scans if s[0] == "Seq Scan"], scans
    assert not [n for n in plan if n["Node Type"] in ("Sort", "Incremental Sort")], plan
    assert any(n["Node Type"] == "Limit" for n in plan)


def test_claim_statements_are_planned_once_per_session(db_url: str) -> None:
    """The claim runs its generic plan, with acks riding and without: left
    to choose, PostgreSQL planned it again at each claim (a custom plan for
    the none, one or two acks sent always looks cheaper than the generic
    plan's guess), which cost more than running it."""
    queue = Queue("planned-once")
    publish(db_url, queue, 12)
    with connect(db_url) as conn:
        queue(conn.channel()).declare()
        t = conn.transport
        for _ in range(12):
            (row,) = t.claim("planned-once", 1, no_ack=False)
            t._acks.append(row[0])  # rides on the next claim, as an ack does
        t.claim("planned-once", 1, no_ack=False)
        for _ in range(10):  # an idle consumer woken: no ack, nothing to claim
            assert t.claim("planned-once", 1, no_ack=False) == []
        plans = t.conn.execute(
            "SELECT name, generic_plans, custom_plans FROM pg_prepared_statements"
            " WHERE name LIKE 'pgbroker_claim%'"
        ).fetchall()
    assert plans == [("pgbroker_claim", 23, 0)]


def test_a_claim_is_one_statement(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A claim sends one statement, with acks riding or not: an idle
    consumer that a NOTIFY wakes for a message another consumer takes costs
    the server one statement, not the six of a claim's transaction before
    (BEGIN, SET CONSTRAINTS, SET LOCAL, the acks, the claim, COMMIT)."""
    queue = Queue("one-statement")
    publish(db_url, queue, 3)
    sent: list[bytes] = []
    real_prepared, real_query = pipeline.send_prepared, pipeline.send_query

    def send_prepared(conn: psycopg.Connection, name: bytes, values: Any) -> None:
        sent.append(name)
        real_prepared(conn, name, values)

    def send_query(conn: psycopg.Connection, query: bytes) -> None:
        sent.append(query)
        real_query(conn, query)

    monkeypatch.setattr(pipeline, "send_prepared", send_prepared)
    monkeypatch.setattr(pipeline, "send_query", send_query)
    with connect(db_url) as conn:
        queue(conn.channel()).declare()
        t = conn.transport
        (first,) = t.claim("one-statement", 1, no_ack=False)
        t._acks.append(first[0])  # rides on the next claim, as an ack does
        assert len(t.claim("one-statement", 2, no_ack=False)) == 2
        assert sent == [b"pgbroker_claim", b"pgbroker_claim"]
        sent.clear()
        for _ in range(5):  # woken, nothing left
            assert t.claim("one-statement", 1, no_ack=False) == []
        assert sent == [b"pgbroker_claim"] * 5


def test_headers_with_nul_round_trip(db_url: str) -> None:
    """Celery copies a string argument's repr, U+0000 included, into the
    headers: stored as json (jsonb cannot hold it), they come back exact."""
    queue = Queue("nul-headers")
    with connect(db_url) as conn:
        producer = Producer(conn.channel())
        headers = {"argsrepr": "('nul:\x00 end',)", "nested": {"k": ["\x00"]}}
        producer.publish({"a": "\x00"}, routing_key=queue.name, declare=[queue], headers=headers)
        got: list[Message] = []
        with Consumer(conn, [queue], callbacks=[lambda body, m: got.append(m)]):
            drain_until(conn, lambda: bool(got))
        assert got[0].headers == headers
        assert got[0].payload == {"a": "\x00"}
        got[0].ack()


def test_queue_name_with_nul_is_refused_not_cut(db_url: str) -> None:
    """libpq takes text parameters up to the first NUL: "a\\0b" must not
    claim from queue "a"."""
    publish(db_url, Queue("a"), 1)
    with connect(db_url) as conn:
        with pytest.raises(psycopg.DataError, match="NUL"):
            conn.transport.claim("a\x00b", 1, no_ack=False)
        assert len(conn.transport.claim("a", 1, no_ack=False)) == 1
