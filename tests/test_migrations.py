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
        # 015_routing_version
        "routing_version",
        # 017_history
        "publish_sample",
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


#: The catalog of every user schema of a database, one query per kind of
#: object, each row naming its schema and object: what two databases must
#: share to hold the same pgbroker schema. Definitions come from PostgreSQL's
#: own pg_get_*def functions, so a changed body, default or option shows.
_NOT_SYSTEM = r"n.nspname NOT LIKE 'pg\_%' AND n.nspname <> 'information_schema'"
CATALOG = {
    "schemas": f"SELECT n.nspname FROM pg_namespace n WHERE {_NOT_SYSTEM}",
    # Tables, views, sequences: kind, persistence (unlogged) and storage
    # options (ALTER TABLE ... SET (fillfactor ...)).
    "relations": f"""
        SELECT n.nspname, c.relname, c.relkind, c.relpersistence, c.reloptions::text
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {_NOT_SYSTEM} AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f', 'c')""",
    # In table order (attnum), so a reordered table differs too.
    "columns": f"""
        SELECT n.nspname, c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod),
               a.attnotnull, pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated,
               a.attcollation::regcollation::text
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE {_NOT_SYSTEM} AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c')
          AND a.attnum > 0 AND NOT a.attisdropped""",
    "indexes": f"""
        SELECT n.nspname, c.relname, pg_get_indexdef(c.oid)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {_NOT_SYSTEM} AND c.relkind IN ('i', 'I')""",
    "constraints": f"""
        SELECT n.nspname, con.conrelid::regclass::text, con.conname, con.contype,
               pg_get_constraintdef(con.oid), con.condeferrable, con.condeferred
        FROM pg_constraint con JOIN pg_namespace n ON n.oid = con.connamespace
        WHERE {_NOT_SYSTEM}""",
    # Functions and procedures: pg_get_functiondef holds the signature, the
    # language, volatility, settings and the body.
    "functions": f"""
        SELECT n.nspname, p.proname, pg_get_function_identity_arguments(p.oid), p.prokind,
               CASE WHEN p.prokind IN ('f', 'p', 'w') THEN pg_get_functiondef(p.oid) END
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE {_NOT_SYSTEM}""",
    "views": f"""
        SELECT n.nspname, c.relname, c.relkind, pg_get_viewdef(c.oid)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {_NOT_SYSTEM} AND c.relkind IN ('v', 'm')""",
    "triggers": f"""
        SELECT n.nspname, c.relname, t.tgname, t.tgenabled, pg_get_triggerdef(t.oid)
        FROM pg_trigger t
        JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {_NOT_SYSTEM} AND NOT t.tgisinternal""",
    "sequences": f"""
        SELECT n.nspname, c.relname, s.seqtypid::regtype::text, s.seqstart, s.seqincrement,
               s.seqmin, s.seqmax, s.seqcache, s.seqcycle
        FROM pg_sequence s
        JOIN pg_class c ON c.oid = s.seqrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {_NOT_SYSTEM}""",
    # Types of their own (enums, domains, composites made by CREATE TYPE),
    # not the row types of tables and views nor array types.
    "types": f"""
        SELECT n.nspname, t.typname, t.typtype, format_type(t.typbasetype, t.typtypmod),
               t.typnotnull,
               (SELECT array_agg(e.enumlabel ORDER BY e.enumsortorder)::text
                FROM pg_enum e WHERE e.enumtypid = t.oid)
        FROM pg_type t
        JOIN pg_namespace n ON n.oid = t.typnamespace
        LEFT JOIN pg_class c ON c.oid = t.typrelid
        WHERE {_NOT_SYSTEM} AND (c.relkind IS NULL OR c.relkind = 'c')
          AND NOT EXISTS (SELECT FROM pg_type e WHERE e.typarray = t.oid)""",
}


def _catalog(conn: psycopg.Connection) -> dict[str, list[tuple[object, ...]]]:
    """Every object of the database's user schemas, by kind (CATALOG)."""
    return {
        kind: sorted(conn.execute(query).fetchall(), key=repr) for kind, query in CATALOG.items()
    }


def _catalog_differences(
    template: dict[str, list[tuple[object, ...]]], fresh: dict[str, list[tuple[object, ...]]]
) -> list[str]:
    """What one catalog holds and the other does not, one line per object."""
    lines = []
    for kind in CATALOG:
        a, b = set(template[kind]), set(fresh[kind])
        lines += [f"{kind}: only in the template: {row}" for row in sorted(a - b, key=repr)]
        lines += [f"{kind}: only in the fresh build: {row}" for row in sorted(b - a, key=repr)]
    return lines


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
    # users get: the same tables, columns, indexes, constraints, functions,
    # views and triggers as the migrations build in an empty database.
    schema.migrate(conn, "pgbroker")
    template, fresh = _catalog(db), _catalog(conn)
    # What the migrations build (a guard: an empty catalog would compare equal).
    for kind in ("columns", "indexes", "constraints", "functions", "views", "sequences"):
        assert fresh[kind], f"the fresh build has no {kind}: the catalog query sees nothing"
    assert ("pgbroker",) in fresh["schemas"]
    differences = _catalog_differences(template, fresh)
    assert not differences, "the template differs from a fresh build:\n" + "\n".join(differences)
    assert _tables(db, "pgbroker") == _tables(conn, "pgbroker")
    assert _versions(db) == _versions(conn)


def test_the_catalog_comparison_sees_each_kind_of_drift(conn: psycopg.Connection) -> None:
    """The comparison above can fail: each change to a migrated schema shows
    up under its kind."""
    schema.migrate(conn, "pgbroker")
    before = _catalog(conn)
    conn.execute(
        """
        ALTER TABLE pgbroker.queue ADD COLUMN drift integer NOT NULL DEFAULT 7;
        ALTER TABLE pgbroker.queue ADD CONSTRAINT drift_positive CHECK (drift > 0);
        CREATE INDEX drift_idx ON pgbroker.queue (drift);
        CREATE FUNCTION pgbroker.drift() RETURNS trigger LANGUAGE plpgsql
            AS 'BEGIN RETURN NEW; END';
        CREATE TRIGGER drift_trigger BEFORE INSERT ON pgbroker.queue
            FOR EACH ROW EXECUTE FUNCTION pgbroker.drift();
        CREATE VIEW pgbroker.drift_view AS SELECT drift FROM pgbroker.queue;
        CREATE SEQUENCE pgbroker.drift_seq;
        CREATE TYPE pgbroker.drift_kind AS ENUM ('a', 'b');
        CREATE SCHEMA drift_schema;
        """
    )
    after = _catalog(conn)
    changed = {kind for kind in CATALOG if before[kind] != after[kind]}
    assert changed == set(CATALOG)
    text = "\n".join(_catalog_differences(before, after))
    assert "columns: only in the fresh build: ('pgbroker', 'queue'" in text
    assert "'drift', 'integer', True, '7'" in text
    # A changed default, body or view definition shows as well.
    before = after
    conn.execute(
        """
        ALTER TABLE pgbroker.queue ALTER COLUMN drift SET DEFAULT 8;
        CREATE OR REPLACE FUNCTION pgbroker.drift() RETURNS trigger LANGUAGE plpgsql
            AS 'BEGIN RETURN NULL; END';
        CREATE OR REPLACE VIEW pgbroker.drift_view AS SELECT drift + 0 AS drift FROM pgbroker.queue;
        """
    )
    after = _catalog(conn)
    assert {kind for kind in CATALOG if before[kind] != after[kind]} == {
        "columns",
        "functions",
        "views",
    }


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
