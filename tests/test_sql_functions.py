"""The shared SQL functions of 014_shared_predicates.sql: ``consumer_alive``
(a session holds the advisory lock of a consumer or a process) and
``add_dead_letter`` (the one INSERT into dead_letter), called directly, as
the statements, views and the sweeper's functions call them."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from importlib import resources
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgbroker.database import queries
from pgbroker.database import schema as schema_mod
from pgbroker.database.sessions import connect
from tests import pgserver


def _lock_oid(db: psycopg.Connection, name: str = "pgbroker") -> int:
    row = db.execute("SELECT oid::bigint FROM pg_namespace WHERE nspname = %s", [name]).fetchone()
    assert row is not None
    return int(row[0])


def _signed(oid: int) -> int:
    """The schema oid as pg_advisory_lock(int4, int4) takes it."""
    return oid - (1 << 32) if oid >= 1 << 31 else oid


def _alive(db: psycopg.Connection, lock_oid: int, key: int, name: str = "pgbroker") -> bool:
    q = sql.SQL("SELECT alive FROM {}.consumer_alive(%s::oid, %s)").format(sql.Identifier(name))
    row = db.execute(q, [lock_oid, key]).fetchone()
    assert row is not None
    return bool(row[0])


@pytest.fixture
def holder(db_url: str) -> Iterator[psycopg.Connection]:
    """Another session, to hold advisory locks as a consumer's session does."""
    with psycopg.connect(pgserver.libpq_url(db_url), autocommit=True) as conn:
        yield conn


def _consumers(db: psycopg.Connection, n: int) -> list[int]:
    rows = db.execute(
        "INSERT INTO pgbroker.consumer (hostname, pid) "
        "SELECT 'h', i FROM generate_series(1, %s) i RETURNING id",
        [n],
    ).fetchall()
    return sorted(r[0] for r in rows)


# --- consumer_alive ----------------------------------------------------------------


def test_consumer_is_alive_while_its_session_holds_the_lock(
    db: psycopg.Connection, holder: psycopg.Connection
) -> None:
    oid = _lock_oid(db)
    live, dead = _consumers(db, 2)
    holder.execute("SELECT pg_advisory_lock(%s, %s)", [_signed(oid), live])
    assert _alive(db, oid, live)
    assert not _alive(db, oid, dead)
    # Another lock class (another schema's consumers) is another consumer.
    assert not _alive(db, oid + 1, live)
    # The one-bigint form of the same (class, key) bits is not a consumer's
    # lock (pg_locks.objsubid 1, not 2).
    holder.execute("SELECT pg_advisory_lock(%s::bigint)", [(_signed(oid) << 32) | dead])
    row = db.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s::oid "
        "AND objid = %s::oid AND objsubid = 1 AND granted",
        [oid, dead],
    ).fetchone()
    assert row == (1,)
    assert not _alive(db, oid, dead)
    # The session ends (its process died): the consumer is dead as soon as
    # the server has ended the backend (close() does not wait for that).
    pid = holder.info.backend_pid
    holder.close()
    _wait_backend_gone(db, pid)
    assert not _alive(db, oid, live)


def _wait_backend_gone(db: psycopg.Connection, pid: int) -> None:
    deadline = time.monotonic() + 10
    while db.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone():
        assert time.monotonic() < deadline, f"backend {pid} still there"
        time.sleep(0.01)


def test_a_process_key_is_alive_like_a_consumer(
    db: psycopg.Connection, holder: psycopg.Connection
) -> None:
    """Process keys are negative int4 (pgbroker.database.forking.process_key),
    held shared by every transport session of the process (process_lock)."""
    oid = _lock_oid(db)
    key = -123456789
    assert not _alive(db, oid, key)
    holder.execute("SELECT pg_advisory_lock_shared(%s, %s)", [_signed(oid), key])
    assert _alive(db, oid, key)
    assert not _alive(db, oid, -key)
    # The extreme keys map to the lock's objid as pg_advisory_lock stores them.
    holder.execute("SELECT pg_advisory_lock_shared(%s, %s)", [_signed(oid), -(1 << 31)])
    assert _alive(db, oid, -(1 << 31))


def test_dead_consumers_and_broker_stats_agree_with_consumer_alive(
    db: psycopg.Connection, holder: psycopg.Connection
) -> None:
    oid = _lock_oid(db)
    ids = _consumers(db, 6)
    live = ids[::2]
    for cid in live:
        holder.execute("SELECT pg_advisory_lock(%s, %s)", [_signed(oid), cid])
    dead = [i for i in ids if i not in live]
    row = db.execute("SELECT pgbroker.dead_consumers(%s::oid)", [oid]).fetchone()
    assert row is not None and row[0] == dead
    assert [i for i in ids if not _alive(db, oid, i)] == dead
    stats = db.execute(
        "SELECT consumers_alive, consumers_dead FROM pgbroker.broker_stats"
    ).fetchone()
    assert stats == (len(live), len(dead))


def _plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _plan_nodes(child)


SWEEP = {
    "channel": "pgbroker",
    "schema_name": "pgbroker",
    "max_deliveries": 10,
    "queues": ["q1"],
    "promote_limit": 1000,
    "dedup_window": 604800.0,
    "prune_limit": 5000,
    "housekeep_limit": 2000,
    "own_host": "h",
    "own_pid": 1,
}


@pytest.mark.parametrize("statement", ["dead_consumers", "broker_stats", "consumers", "sweep"])
def test_the_lock_table_is_read_once_whatever_the_consumers(
    db: psycopg.Connection, holder: psycopg.Connection, statement: str
) -> None:
    """consumer_alive is inlined: one read of pg_lock_status() per use in a
    statement (it takes every lock-manager partition lock), not one per
    consumer row, as a non-inlined function (plpgsql, STRICT, a scalar
    boolean, a sub-select argument) would."""
    ids = _consumers(db, 50)
    oid = _lock_oid(db)
    db.execute(
        "INSERT INTO pgbroker.consumer_process (consumer_id, process_key) "
        "SELECT unnest(%s::int[]), -7",
        [ids],
    )
    holder.execute("SELECT pg_advisory_lock_shared(%s, -7)", [_signed(oid)])
    for cid in ids[:10]:
        holder.execute("SELECT pg_advisory_lock(%s, %s)", [_signed(oid), cid])
    params: dict[str, Any] = {"oid": oid}
    if statement == "dead_consumers":
        # A function's own statements are not in EXPLAIN: its body's query.
        body = db.execute("SELECT prosrc FROM pg_proc WHERE proname = 'dead_consumers'").fetchone()
        assert body is not None
        query = re.sub(r"\block_oid\b", "%(oid)s::oid", body[0]).encode()
        assert b"consumer_alive" in query
    elif statement == "broker_stats":
        query = b"SELECT * FROM pgbroker.broker_stats"
    elif statement == "consumers":
        query = queries.for_schema("pgbroker", "admin.sql")["consumers"].as_bytes(db)
        params = {}
    else:
        query = queries.for_schema("pgbroker")["sweep"].as_bytes(db)
        params = {**SWEEP, "lock_oid": oid}
    row = db.execute(b"EXPLAIN (ANALYZE, FORMAT JSON) " + query, params).fetchone()
    assert row is not None
    nodes = list(_plan_nodes(row[0][0]["Plan"]))
    functions = [
        n for n in nodes if n["Node Type"] == "Function Scan" and n["Function Name"] != "unnest"
    ]
    assert functions, nodes
    assert {n.get("Function Name") for n in functions} == {"pg_lock_status"}, functions
    assert [n["Actual Loops"] for n in functions] == [1] * len(functions), functions
    # The consumer's own lock, and for the sweep its process's key too.
    assert len(functions) == (2 if statement == "sweep" else 1)
    if statement == "sweep":
        assert db.execute("SELECT count(*) FROM pgbroker.consumer").fetchone() == (10,)


# --- add_dead_letter ---------------------------------------------------------------


def _columns(db: psycopg.Connection, table: str) -> list[str]:
    rows = db.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = 'pgbroker' AND table_name = %s ORDER BY ordinal_position",
        [table],
    ).fetchall()
    return [r[0] for r in rows]


def _message(db: psycopg.Connection) -> int:
    row = db.execute(
        """
        INSERT INTO pgbroker.message (
            queue, state, priority, consumer_id, delivery_count, published_at, claimed_at,
            visible_at, expires_at, exchange, routing_key, task_id, task_name, content_type,
            content_encoding, headers, properties, body)
        VALUES ('q1', 'reserved', 7, 1, 4, now() - interval '1 hour', now(), now(),
                now() + interval '1 day', 'ex', 'rk', 'tid', 'tasks.add', 'application/json',
                'utf-8', '{"id": "tid", "x": "\\u0000"}', '{"delivery_tag": "t"}',
                '\\x00ff10')
        RETURNING id
        """
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_message_row_is_copied_whole(db: psycopg.Connection) -> None:
    mid = _message(db)
    row = db.execute(
        "SELECT pgbroker.add_dead_letter('because', m) FROM pgbroker.message m WHERE m.id = %s",
        [mid],
    ).fetchone()
    assert row is not None
    letter_id = row[0]
    # Every dead_letter column that the message table has too is copied:
    # a column added to both and forgotten in the function fails here.
    shared = [c for c in _columns(db, "dead_letter") if c in _columns(db, "message")]
    assert shared and "id" in shared
    shared.remove("id")
    assert len(shared) >= 13, shared
    cols = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in shared)
    got = db.execute(
        sql.SQL("SELECT {} FROM pgbroker.dead_letter WHERE id = %s").format(cols), [letter_id]
    ).fetchone()
    want = db.execute(
        sql.SQL("SELECT {} FROM pgbroker.message WHERE id = %s").format(cols), [mid]
    ).fetchone()
    assert got == want
    meta = db.execute(
        "SELECT reason, died_at > now() - interval '1 minute' FROM pgbroker.dead_letter "
        "WHERE id = %s",
        [letter_id],
    ).fetchone()
    assert meta == ("because", True)
    # Copied, not moved: the caller deletes the message.
    assert db.execute("SELECT count(*) FROM pgbroker.message").fetchone() == (1,)


def test_deleted_rows_are_dead_lettered_in_one_statement(db: psycopg.Connection) -> None:
    """As reject and the sweep call it: from a DELETE ... RETURNING *."""
    ids = [_message(db) for _ in range(3)]
    rows = db.execute(
        """
        WITH gone AS (DELETE FROM pgbroker.message WHERE id = ANY(%s) RETURNING *)
        SELECT pgbroker.add_dead_letter('rejected', g) FROM gone g
        """,
        [ids[:2]],
    ).fetchall()
    assert len(rows) == 2
    letters = db.execute(
        "SELECT id, reason, queue, delivery_count FROM pgbroker.dead_letter ORDER BY id"
    ).fetchall()
    assert letters == [(r[0], "rejected", "q1", 4) for r in sorted(rows)]
    assert db.execute("SELECT array_agg(id) FROM pgbroker.message").fetchone() == ([ids[2]],)


def test_a_dead_letter_by_fields(db: psycopg.Connection) -> None:
    """As publish stores a message routed nowhere: no message row."""
    row = db.execute(
        """
        SELECT pgbroker.add_dead_letter(
            reason => 'unroutable', queue => NULL, delivery_count => 0,
            published_at => now(), exchange => 'ex', routing_key => 'nowhere',
            task_id => NULL, task_name => NULL, priority => 3::smallint,
            content_type => 'text/plain', content_encoding => 'utf-8',
            headers => '{}'::json, properties => '{}'::json, body => '\\x41'::bytea)
        """
    ).fetchone()
    assert row is not None
    got = db.execute(
        "SELECT reason, queue, delivery_count, exchange, routing_key, priority, body "
        "FROM pgbroker.dead_letter WHERE id = %s",
        [row[0]],
    ).fetchone()
    assert got == ("unroutable", None, 0, "ex", "nowhere", 3, b"A")


def test_statements_use_the_shared_functions() -> None:
    """No statement writes the predicates out again (sql/*.sql): the pg_locks
    test of a consumer and the INSERT into dead_letter live in migration 014."""
    folder = resources.files("pgbroker.sql")
    texts = {
        entry.name: entry.read_text("utf-8")
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    }
    assert "queries.sql" in texts and "admin.sql" in texts
    for name, text in texts.items():
        code = re.sub(r"--[^\n]*", "", text)
        assert not re.search(r"INSERT\s+INTO\s+\{schema\}\.dead_letter\b", code), name
        if name != "durable.sql":  # its lock_holder: exclusive runs' locks, not consumers'
            assert "pg_locks" not in code, name


# --- migration -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pgbroker", 'Jobs "x"; DROP'])
def test_upgrade_from_013_keeps_data_and_works(
    empty_db_url: str, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    real = schema_mod.migrations()
    ident = sql.Identifier(name)
    with connect(empty_db_url) as conn:
        monkeypatch.setattr(schema_mod, "migrations", lambda: real[:13])
        schema_mod.migrate(conn, name)
        conn.execute(
            sql.SQL("INSERT INTO {}.consumer (hostname, pid) VALUES ('h', 1), ('h', 2)").format(
                ident
            )
        )
        oid = _lock_oid(conn, name)
        row = conn.execute(
            sql.SQL("SELECT {}.dead_consumers(%s::oid)").format(ident), [oid]
        ).fetchone()
        assert row is not None
        before = row[0]
        monkeypatch.setattr(schema_mod, "migrations", lambda: real[:14])  # up to 014
        applied = schema_mod.migrate(conn, name)
        assert [m.name for m in applied] == ["shared_predicates"]
        assert conn.execute(
            sql.SQL("SELECT {}.dead_consumers(%s::oid)").format(ident), [oid]
        ).fetchone() == (before,)
        conn.execute(
            sql.SQL("SELECT pg_advisory_lock(%s, min(id)) FROM {}.consumer").format(ident),
            [_signed(oid)],
        )
        assert _alive(conn, oid, before[0], name)
        assert conn.execute(
            sql.SQL("SELECT consumers_alive, consumers_dead FROM {}.broker_stats").format(ident)
        ).fetchone() == (1, 1)
