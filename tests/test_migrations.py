"""Migrations: applied once, atomically, under concurrency, and as declared."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest

from pgbroker.database import schema
from pgbroker.database.schema import Migration
from pgbroker.database.sessions import connect
from pgbroker.errors import SchemaError

#: Every table a database built by the migrations holds. Update it together
#: with a new migration; anything else is schema drift.
EXPECTED_TABLES = {
    "pgbroker": [
        # 001_broker
        "binding",
        "consumer",
        "consumer_queue",
        "dead_letter",
        "exchange",
        "message",
        "queue",
        "redelivery",
        # 002_results
        "chord",
        "chord_part",
        "group_result",
        "task_result",
        # 003_durable_steps
        "durable_step",
        # 004_beat
        "beat_entry",
        # 005_delivery
        "published_task",
        # 006_durable_waits
        "durable_event",
        "durable_run",
        "durable_wait",
        # 012_sessions_lost
        "consumer_process",
        # bookkeeping
        "schema_version",
    ],
}


@pytest.fixture
def conn(empty_db_url: str) -> Iterator[psycopg.Connection]:
    with connect(empty_db_url) as c:
        yield c


def _versions(conn: psycopg.Connection, name: str = "pgbroker") -> list[tuple[int, str]]:
    q = psycopg.sql.SQL("SELECT version, name FROM {}.schema_version ORDER BY version").format(
        psycopg.sql.Identifier(name)
    )
    return [(int(v), str(n)) for v, n in conn.execute(q).fetchall()]


def _tables(conn: psycopg.Connection, name: str) -> list[str]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') ORDER BY 1",
        [name],
    ).fetchall()
    return [r[0] for r in rows]


_REAL_MIGRATIONS = schema.migrations


def _with_extra(*extra: Migration) -> list[Migration]:
    return [*_REAL_MIGRATIONS(), *extra]


def _next() -> int:
    return schema.latest_version() + 1


def test_fresh_database_gets_every_migration(conn: psycopg.Connection) -> None:
    assert schema.current_version(conn, "pgbroker") is None
    applied = schema.migrate(conn, "pgbroker")
    expected = [(m.version, m.name) for m in schema.migrations()]
    assert [(m.version, m.name) for m in applied] == expected
    assert _versions(conn) == expected
    assert expected[0] == (1, "broker")
    assert schema.current_version(conn, "pgbroker") == schema.latest_version()
    schema.require_current(conn, "pgbroker")


def test_migrations_build_exactly_the_declared_tables(conn: psycopg.Connection) -> None:
    schema.migrate(conn, "pgbroker")
    assert _tables(conn, "pgbroker") == sorted(EXPECTED_TABLES["pgbroker"])
    # Nothing leaks into other schemas (public stays empty).
    assert _tables(conn, "public") == []


def test_template_database_matches_a_fresh_build(
    conn: psycopg.Connection, db: psycopg.Connection
) -> None:
    # The conftest template is built by the same code; the suite tests what
    # users get.
    schema.migrate(conn, "pgbroker")
    assert _tables(db, "pgbroker") == _tables(conn, "pgbroker")
    assert _versions(db) == _versions(conn)


def test_rerunning_is_a_no_op(conn: psycopg.Connection) -> None:
    schema.migrate(conn, "pgbroker")
    before = conn.execute("SELECT version, applied_at FROM pgbroker.schema_version").fetchall()
    assert schema.migrate(conn, "pgbroker") == []
    assert schema.migrate(conn, "pgbroker") == []
    after = conn.execute("SELECT version, applied_at FROM pgbroker.schema_version").fetchall()
    assert after == before


def test_concurrent_migrators_apply_each_migration_once(empty_db_url: str) -> None:
    n = 8
    start = threading.Barrier(n)
    results: list[list[Migration]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def migrator() -> None:
        try:
            with connect(empty_db_url) as c:
                start.wait(timeout=30)
                applied = schema.migrate(c, "pgbroker")
            with lock:
                results.append(applied)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=migrator) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(results) == n
    applied = sorted((m.version, m.name) for run in results for m in run)
    expected = [(m.version, m.name) for m in schema.migrations()]
    assert applied == expected  # each migration exactly once, all by one migrator
    assert sum(1 for run in results if run) == 1
    with connect(empty_db_url) as c:
        assert _versions(c) == expected
        assert _tables(c, "pgbroker") == sorted(EXPECTED_TABLES["pgbroker"])


def test_failing_migration_rolls_back_and_keeps_the_version(
    conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    schema.migrate(conn, "pgbroker")
    before = _versions(conn)
    broken = Migration(
        _next(),
        "broken",
        "CREATE TABLE {schema}.half_done (x integer);\nSELECT 1 / 0;",
    )
    monkeypatch.setattr(schema, "migrations", lambda: _with_extra(broken))
    with pytest.raises(SchemaError) as info:
        schema.migrate(conn, "pgbroker")
    text = str(info.value)
    assert f"migration {broken.version:03d}_broken" in text
    assert "division by zero" in text
    assert f"stays at version {broken.version - 1}" in text
    assert _versions(conn) == before
    assert conn.execute("SELECT to_regclass('pgbroker.half_done')").fetchone() == (None,)
    # The session is usable, and a fixed migration then applies.
    fixed = Migration(broken.version, "fixed", "CREATE TABLE {schema}.half_done (x integer);")
    monkeypatch.setattr(schema, "migrations", lambda: _with_extra(fixed))
    assert [m.name for m in schema.migrate(conn, "pgbroker")] == ["fixed"]
    assert _versions(conn) == [*before, (fixed.version, "fixed")]


def test_failure_on_a_fresh_database_leaves_nothing(
    conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = Migration(_next(), "broken", "SELECT no_such_column FROM {schema}.message;")
    monkeypatch.setattr(schema, "migrations", lambda: _with_extra(broken))
    with pytest.raises(SchemaError, match="no_such_column"):
        schema.migrate(conn, "pgbroker")
    # All-or-nothing: the earlier migrations of that run are gone too.
    assert schema.current_version(conn, "pgbroker") is None
    assert conn.execute("SELECT to_regnamespace('pgbroker')").fetchone() == (None,)


def test_pending_sql_prints_without_applying(conn: psycopg.Connection) -> None:
    text = schema.pending_sql(conn, "pgbroker")
    assert text.startswith('-- pgbroker schema "pgbroker": version 0 -> ')
    assert "BEGIN;" in text and text.rstrip().endswith("COMMIT;")
    assert "pg_advisory_xact_lock" in text
    assert 'CREATE TABLE "pgbroker".message' in text
    for m in schema.migrations():
        assert f"-- {m.version:03d}_{m.name}" in text
    # Nothing happened.
    assert conn.execute("SELECT to_regnamespace('pgbroker')").fetchone() == (None,)
    # What a DBA would run by hand gives the same result as migrate().
    conn.execute(text)
    schema.require_current(conn, "pgbroker")
    assert _versions(conn) == [(m.version, m.name) for m in schema.migrations()]
    assert _tables(conn, "pgbroker") == sorted(EXPECTED_TABLES["pgbroker"])
    assert schema.pending_sql(conn, "pgbroker") == ""


def test_pending_sql_holds_only_what_is_missing(
    conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    schema.migrate(conn, "pgbroker")
    extra = Migration(_next(), "extra", "CREATE TABLE {schema}.extra (x integer);")
    monkeypatch.setattr(schema, "migrations", lambda: _with_extra(extra))
    text = schema.pending_sql(conn, "pgbroker")
    assert f"-- {extra.version:03d}_extra" in text
    assert 'CREATE TABLE "pgbroker".extra' in text
    assert "-- 001_broker" not in text
    assert conn.execute("SELECT to_regclass('pgbroker.extra')").fetchone() == (None,)


def test_require_current_when_missing(conn: psycopg.Connection) -> None:
    with pytest.raises(SchemaError) as info:
        schema.require_current(conn, "pgbroker")
    text = str(info.value)
    assert "has no pgbroker schema 'pgbroker'" in text
    assert "pgbroker migrate --url URL`" in text
    assert "auto_migrate=True" in text


def test_require_current_when_behind(
    conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    schema.migrate(conn, "pgbroker")
    have = schema.latest_version()
    extra = Migration(have + 1, "extra", "SELECT 1;")
    monkeypatch.setattr(schema, "migrations", lambda: _with_extra(extra))
    with pytest.raises(SchemaError) as info:
        schema.require_current(conn, "pgbroker")
    text = str(info.value)
    assert f"is at version {have}, pgbroker needs {have + 1}" in text
    assert "pgbroker migrate" in text


def test_require_current_when_ahead(conn: psycopg.Connection) -> None:
    schema.migrate(conn, "pgbroker")
    ahead = _next()
    conn.execute(
        "INSERT INTO pgbroker.schema_version (version, name) VALUES (%s, 'future')", [ahead]
    )
    with pytest.raises(SchemaError) as info:
        schema.require_current(conn, "pgbroker")
    text = str(info.value)
    assert f"is at version {ahead}, newer than this pgbroker" in text
    assert "upgrade the pgbroker package" in text
    # migrate() does not touch a newer schema (rolling upgrades: old
    # workers keep running against new additive migrations).
    assert schema.migrate(conn, "pgbroker") == []


def test_schema_names_are_quoted(conn: psycopg.Connection) -> None:
    name = 'Jobs "2024"; DROP'
    applied = schema.migrate(conn, name)
    assert len(applied) == schema.latest_version()
    assert _tables(conn, name) == sorted(EXPECTED_TABLES["pgbroker"])
    assert schema.current_version(conn, "pgbroker") is None
    with pytest.raises(SchemaError, match=r"--schema other`"):
        schema.require_current(conn, "other")  # names the schema flag
    schema.require_current(conn, name)


def test_two_schemas_in_one_database_are_independent(conn: psycopg.Connection) -> None:
    assert schema.migrate(conn, "app_a")
    assert schema.migrate(conn, "app_b")
    assert _versions(conn, "app_a") == _versions(conn, "app_b")
