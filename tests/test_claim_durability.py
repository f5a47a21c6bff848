"""A claim that carries no ack commits without waiting for the WAL flush.

A claim lost in a server crash only makes its messages ready again, as
recovery does; an ack lost in a crash delivers a finished task again. So a
claim without acks commits with ``synchronous_commit = off`` and a claim
carrying acks waits for the flush (``claim_settings``, migration 019, called
by ``claim`` in sql/queries.sql; docs/delivery.md "What a server crash may
undo"). These tests fail if the ackless claim's commit is made synchronous
again, or if the acks' commit stops being durable.
"""

from __future__ import annotations

import time

import psycopg
import pytest
from kombu import Connection, Producer, Queue

from tests.kombu_helpers import connect


def publish(url: str, queue: Queue, n: int) -> None:
    with Connection(url) as conn:
        producer = Producer(conn.channel())
        for i in range(n):
            producer.publish({"i": i}, routing_key=queue.name, declare=[queue])


def test_claim_commits_asynchronously_only_without_acks(
    db_url: str, db: psycopg.Connection
) -> None:
    """The synchronous_commit in force when the claim's rows are updated (a
    trigger records it, inside the claim's transaction): off for a claim
    without acks, the server's setting for one that carries acks."""
    db.execute("CREATE TABLE claim_mode (setting text)")
    db.execute(
        "CREATE FUNCTION record_claim_mode() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN INSERT INTO claim_mode VALUES (current_setting('synchronous_commit'));"
        " RETURN NEW; END $$"
    )
    db.execute(
        "CREATE TRIGGER record_claim_mode BEFORE UPDATE ON pgbroker.message"
        " FOR EACH ROW EXECUTE FUNCTION record_claim_mode()"
    )
    configured = db.execute("SHOW synchronous_commit").fetchone()
    assert configured is not None and configured[0] != "off"  # the server's default
    queue = Queue("durability")
    publish(db_url, queue, 2)
    with connect(db_url) as conn:
        conn.channel()
        t = conn.transport
        t.attach("durability")
        first = t.claim("durability", 1, no_ack=False)
        assert len(first) == 1 and not t._acks
        t._defer_acks = True  # the ack waits for the next statement: the claim
        t.ack(first[0][0])
        t._defer_acks = False
        second = t.claim("durability", 1, no_ack=False)
        assert len(second) == 1 and not t._acks
        t.ack(second[0][0])
        # The setting is local to the claim's transaction: gone after it.
        after = t.conn.execute("SHOW synchronous_commit").fetchone()
    assert after == configured
    rows = [r[0] for r in db.execute("SELECT setting FROM claim_mode").fetchall()]
    assert rows == ["off", configured[0]]
    assert db.execute("SELECT count(*) FROM pgbroker.message").fetchone() == (0,)


def test_a_claim_whose_acks_removed_nothing_commits_asynchronously(
    db_url: str, db: psycopg.Connection
) -> None:
    """An ack whose message a task's finish removed already (its result,
    hand-off and ack commit together, pgbroker/broker/finish.py) removes
    nothing when it rides on the next claim: that claim commits without
    waiting for the flush, as one without acks."""
    db.execute("CREATE TABLE claim_mode (setting text)")
    db.execute(
        "CREATE FUNCTION record_claim_mode() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN INSERT INTO claim_mode VALUES (current_setting('synchronous_commit'));"
        " RETURN NEW; END $$"
    )
    db.execute(
        "CREATE TRIGGER record_claim_mode BEFORE UPDATE ON pgbroker.message"
        " FOR EACH ROW EXECUTE FUNCTION record_claim_mode()"
    )
    queue = Queue("durability")
    publish(db_url, queue, 2)
    with connect(db_url) as conn:
        conn.channel()
        t = conn.transport
        t.attach("durability")
        first = t.claim("durability", 1, no_ack=False)
        db.execute("DELETE FROM pgbroker.message WHERE id = %s", (first[0][0],))  # the finish
        t._defer_acks = True
        t.ack(first[0][0])
        t._defer_acks = False
        second = t.claim("durability", 1, no_ack=False)
        assert len(second) == 1 and not t._acks
        t.ack(second[0][0])
    rows = [r[0] for r in db.execute("SELECT setting FROM claim_mode").fetchall()]
    assert rows == ["off", "off"]
    assert db.execute("SELECT count(*) FROM pgbroker.message").fetchone() == (0,)


def wal_syncs(db: psycopg.Connection) -> int:
    db.execute("SELECT pg_stat_clear_snapshot()")
    if db.info.server_version >= 180000:
        # PostgreSQL 18 moved the WAL's I/O counts to pg_stat_io.
        query = "SELECT sum(fsyncs) FROM pg_stat_io WHERE object = 'wal'"
    else:
        query = "SELECT wal_sync FROM pg_stat_wal"
    row = db.execute(query).fetchone()
    assert row is not None
    return int(row[0])


N = 60


def test_ackless_claims_save_wal_syncs(db_url: str, db: psycopg.Connection) -> None:
    """N claims of one message each: carrying an ack each, every commit waits
    for a WAL sync of its own (at least N syncs, pg_stat_wal counts them;
    half of that is asserted, since a sync another session makes for our
    commit may be reported late); without acks, they need next to none (the
    WAL writer flushes them in the background). Other sessions' syncs only
    add to the count, so the ackless figure is the lowest of three tries."""
    settings: dict[str, str] = dict(
        db.execute(
            "SELECT name, setting FROM pg_settings"
            " WHERE name IN ('fsync', 'wal_sync_method', 'synchronous_commit')"
        ).fetchall()
    )
    if settings["fsync"] != "on" or settings["synchronous_commit"] == "off":
        pytest.skip(f"the server does not flush commits: {settings}")
    if settings["wal_sync_method"] not in ("fdatasync", "fsync", "fsync_writethrough"):
        pytest.skip(f"pg_stat_wal.wal_sync does not count {settings['wal_sync_method']}")
    queue = Queue("syncs")
    publish(db_url, queue, 4 * N + 1)
    with connect(db_url) as conn:
        conn.channel()
        t = conn.transport
        t.attach("syncs")

        def flushed_syncs() -> int:
            # The session's own statistics are flushed when it goes idle
            # after this; the next statement starts once that is done.
            t.conn.execute("SELECT pg_stat_force_next_flush()")
            t.conn.execute("SELECT 1")
            return wal_syncs(db)

        # Claims carrying acks: each claim takes the ack of the previous one.
        first = t.claim("syncs", 1, no_ack=False)
        before = flushed_syncs()
        tag = first[0][0]
        t._defer_acks = True
        for _ in range(N):
            t.ack(tag)
            rows = t.claim("syncs", 1, no_ack=False)
            assert len(rows) == 1 and not t._acks  # the ack rode on the claim
            tag = rows[0][0]
        t._defer_acks = False
        durable = flushed_syncs() - before
        t.ack(tag)

        # Claims without acks (acked afterwards, outside the count).
        ackless = []
        for _ in range(3):
            before = flushed_syncs()
            tags = []
            for _ in range(N):
                rows = t.claim("syncs", 1, no_ack=False)
                assert len(rows) == 1
                tags.append(rows[0][0])
            ackless.append(flushed_syncs() - before)
            for tag in tags:
                t.ack(tag)
            time.sleep(0.05)
    print(f"WAL syncs for {N} claims: {durable} carrying acks, {ackless} without")
    assert durable >= N // 2, f"claims carrying acks: {durable} WAL syncs for {N} claims"
    assert min(ackless) <= N // 6, f"ackless claims: {ackless} WAL syncs for {N} claims"
