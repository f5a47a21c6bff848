"""Numbered migrations, recorded in ``<schema>.schema_version``.

Each file ``migrations/NNN_name.sql`` adds one version row. ``migrate`` runs
every pending migration in one transaction, each in its own savepoint with
its version row: a failing migration rolls everything of that run back, so
the recorded version is never ahead of the tables. Concurrent migrators
(many workers starting at once) are serialised by a transaction advisory
lock, and the one that waited finds the work done.

Applications that may not create the schema (``auto_migrate=False``) only
check it: :func:`require_current` says what to run or grant when it is
missing, outdated or not accessible.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from pgbroker.errors import SchemaError
from pgbroker.options import schema_name

logger = logging.getLogger("pgbroker.database")

_FILE = re.compile(r"^(\d{3})_(\w+)\.sql$")

# pg_advisory_xact_lock(int4, int4): this key and a hash of the schema name.
_LOCK = "SELECT pg_advisory_xact_lock(hashtext('pgbroker.migrate'), hashtext({}))"


@dataclasses.dataclass(frozen=True)
class Migration:
    version: int
    name: str
    text: str

    def statement(self, schema: str) -> sql.Composed:
        return sql.SQL(self.text).format(schema=sql.Identifier(schema))


def migrations() -> list[Migration]:
    found = []
    for entry in resources.files("pgbroker.migrations").iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    assert [m.version for m in found] == list(range(1, len(found) + 1)), "gap in migrations"
    return found


def latest_version() -> int:
    return migrations()[-1].version


def current_version(conn: psycopg.Connection, schema: str) -> int | None:
    """The applied version, or None when the schema has no version table."""
    q = sql.SQL("SELECT coalesce(max(version), 0) FROM {}.schema_version").format(
        sql.Identifier(schema)
    )
    try:
        row = conn.execute(
            "SELECT to_regclass(format('%%I.schema_version', %s::text)) IS NOT NULL", [schema]
        ).fetchone()
        if not row or not row[0]:
            return None
        result = conn.execute(q).fetchone()
    except psycopg.errors.InsufficientPrivilege as exc:
        # to_regclass() too fails without USAGE on the schema.
        raise _access_error(conn, schema, str(exc.diag.message_primary or exc)) from None
    return int(result[0]) if result else 0


def pending_sql(conn: psycopg.Connection, schema: str) -> str:
    """The SQL ``migrate`` would run, for a DBA to read or run by hand.

    One transaction, under the same lock as :func:`migrate`; empty when the
    schema is up to date.
    """
    return migration_sql(schema, current_version(conn, schema) or 0, conn)


def migration_sql(schema: str, from_version: int = 0, context: Any = None) -> str:
    """The SQL that brings ``schema`` from ``from_version`` to the latest
    version (from 0: a new database), or "" when there is nothing to do."""
    schema_name("", "schema", schema)  # before anything is created
    pending = [m for m in migrations() if m.version > from_version]
    if not pending:
        return ""
    ident = sql.Identifier(schema).as_string(context)
    chunks = [
        f"-- pgbroker schema {ident}: version {from_version} -> {pending[-1].version}",
        "BEGIN;",
        sql.SQL(_LOCK + ";").format(sql.Literal(schema)).as_string(context),
        _preamble(schema).as_string(context),
    ]
    for m in pending:
        chunks.append(f"-- {m.version:03d}_{m.name}\n" + m.statement(schema).as_string(context))
        chunks.append(_record(schema, m).as_string(context))
    chunks.append("COMMIT;\n")
    return "\n".join(chunks)


def migrate(conn: psycopg.Connection, schema: str) -> list[Migration]:
    """Bring ``schema`` to the latest version; return what was applied."""
    schema_name("", "schema", schema)  # before anything is created
    wanted = latest_version()
    version = current_version(conn, schema)
    if version is not None and version >= wanted:
        if version > wanted:
            # Another process runs a newer pgbroker; its migrations are
            # additive, so this one keeps working.
            logger.warning(
                "schema %r is at version %d, newer than this pgbroker (%d): upgrade pgbroker",
                schema,
                version,
                wanted,
            )
        check_access(conn, schema)
        return []  # the common case: no lock, two cheap queries
    applied = []
    current: Migration | None = None
    try:
        with conn.transaction():
            # Serialise migrators of this schema; the key is derived from the
            # schema name so that two pgbroker schemas do not block each other.
            conn.execute(sql.SQL(_LOCK).format(sql.Literal(schema)))
            conn.execute(_preamble(schema))
            version = current_version(conn, schema) or 0
            for m in migrations():
                if m.version <= version:
                    continue
                current = m
                with conn.transaction():  # a savepoint: one migration, one version row
                    conn.execute(m.statement(schema))
                    conn.execute(_record(schema, m))
                applied.append(m)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise _create_error(conn, schema, str(exc.diag.message_primary or exc)) from None
    except psycopg.OperationalError:
        raise  # lost connection, server shutting down...: Kombu retries these
    except psycopg.Error as exc:
        what = f"migration {current.version:03d}_{current.name}" if current else "migration"
        raise SchemaError(
            f"{what} of schema {schema!r} failed, nothing was applied "
            f"(the schema stays at version {version or 0}): "
            f"{type(exc).__name__}: {exc.diag.message_primary or exc}"
        ) from exc
    if applied:
        logger.info(
            "schema %r migrated to version %d (%s)",
            schema,
            applied[-1].version,
            ", ".join(f"{m.version:03d}_{m.name}" for m in applied),
        )
    return applied


def require_current(conn: psycopg.Connection, schema: str) -> None:
    """Raise a clear error unless the schema is at the latest version and
    this session may use it."""
    schema_name("", "schema", schema)
    version = current_version(conn, schema)
    wanted = latest_version()
    if version == wanted:
        check_access(conn, schema)
        return
    if version is None:
        state = (
            f"database {conn.info.dbname!r} has no pgbroker schema {schema!r} "
            f"(pgbroker needs version {wanted})"
        )
    elif version > wanted:
        raise SchemaError(
            f"schema {schema!r} is at version {version}, newer than this pgbroker "
            f"(which knows versions up to {wanted}): upgrade the pgbroker package"
        )
    else:
        state = f"schema {schema!r} is at version {version}, pgbroker needs {wanted}"
    raise SchemaError(
        f"{state}: run `pgbroker migrate --url URL{_schema_flag(schema)}` as the "
        "database owner, or set the transport option auto_migrate=True"
    )


def check_access(conn: psycopg.Connection, schema: str) -> None:
    """Raise SchemaError unless this session may use every pgbroker table."""
    row = conn.execute(_ACCESS, {"schema": schema}).fetchone()
    if row is None or row[0]:  # no schema (nothing to check), or it is fine
        return
    raise _access_error(conn, schema, row[1])


# Whether the session has USAGE on the schema and the DML privileges on
# every table (SELECT only on schema_version, and on publish_sample, which
# only sample_publishes() writes, as its owner: 017_history.sql; identity
# columns need no sequence privilege); else what is missing, grouped by the
# privileges missing: "no DELETE privilege on binding, message; no
# privileges on ...".
_ACCESS = """
WITH s AS (SELECT oid FROM pg_namespace WHERE nspname = %(schema)s),
objects AS (
    SELECT c.relname::text AS name,
           array_remove(ARRAY[
               CASE WHEN NOT has_table_privilege(c.oid, 'SELECT') THEN 'SELECT' END,
               CASE WHEN c.relname NOT IN ('schema_version', 'publish_sample')
                         AND NOT has_table_privilege(c.oid, 'INSERT') THEN 'INSERT' END,
               CASE WHEN c.relname NOT IN ('schema_version', 'publish_sample')
                         AND NOT has_table_privilege(c.oid, 'UPDATE') THEN 'UPDATE' END,
               CASE WHEN c.relname NOT IN ('schema_version', 'publish_sample')
                         AND NOT has_table_privilege(c.oid, 'DELETE') THEN 'DELETE' END
           ], NULL) AS privileges
    FROM pg_class c, s
    WHERE c.relnamespace = s.oid AND c.relkind IN ('r', 'p')
    UNION ALL
    SELECT c.relname::text, ARRAY['USAGE']
    FROM pg_class c, s
    WHERE c.relnamespace = s.oid
      -- CASE: the planner may test the privilege before the relkind.
      AND CASE WHEN c.relkind = 'S' THEN NOT has_sequence_privilege(c.oid, 'USAGE') END
      AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'i')
),
missing AS (SELECT * FROM objects WHERE privileges <> '{}'),
grouped AS (
    SELECT CASE WHEN privileges = ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']
                THEN 'no privileges on '
                ELSE 'no ' || array_to_string(privileges, ', ') || ' privilege on ' END
           || string_agg(name, ', ' ORDER BY name) AS text,
           cardinality(privileges) AS n
    FROM missing GROUP BY privileges
)
SELECT has_schema_privilege(s.oid, 'USAGE') AND NOT EXISTS (SELECT FROM missing),
       CASE WHEN has_schema_privilege(s.oid, 'USAGE')
            THEN (SELECT string_agg(text, '; ' ORDER BY n DESC, text) FROM grouped)
            ELSE 'no USAGE privilege on the schema' END
FROM s
"""


def _access_error(conn: psycopg.Connection, schema: str, reason: str) -> SchemaError:
    if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        # Say everything that is missing, not just the first table that failed.
        row = conn.execute(_ACCESS, {"schema": schema}).fetchone()
        if row is not None and not row[0]:
            reason = row[1]
    role = sql.Identifier(conn.info.user).as_string(conn)
    ident = sql.Identifier(schema).as_string(conn)
    return SchemaError(
        f"role {conn.info.user!r} may not use pgbroker's schema {schema!r} ({reason}). "
        f"As the schema's owner, grant it: GRANT USAGE ON SCHEMA {ident} TO {role}; "
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {ident} TO {role}; "
        f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {ident} TO {role};"
    )


def _create_error(conn: psycopg.Connection, schema: str, reason: str) -> SchemaError:
    user = conn.info.user
    role = sql.Identifier(user).as_string(conn)
    run = f"run `pgbroker migrate --url URL{_schema_flag(schema)}` as the database owner"
    row = conn.execute(
        "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = %s", [schema]
    ).fetchone()
    if row is None:
        grant = f"GRANT CREATE ON DATABASE {sql.Identifier(conn.info.dbname).as_string(conn)}"
        return SchemaError(
            f"role {user!r} may not create pgbroker's schema {schema!r} ({reason}). Either "
            f"{run} and set the transport option auto_migrate=False, or let this role "
            f"create it: {grant} TO {role};"
        )
    return SchemaError(
        f"role {user!r} may not upgrade pgbroker's schema {schema!r}, owned by {row[0]} "
        f"({reason}): {run} (as {row[0]}), and set the transport option auto_migrate=False "
        "for roles that only use the schema"
    )


def _schema_flag(schema: str) -> str:
    return "" if schema == "pgbroker" else f" --schema {schema}"


def _preamble(schema: str) -> sql.Composed:
    return sql.SQL(
        "CREATE SCHEMA IF NOT EXISTS {schema};\n"
        "CREATE TABLE IF NOT EXISTS {schema}.schema_version (\n"
        "    version integer PRIMARY KEY,\n"
        "    name text NOT NULL,\n"
        "    applied_at timestamptz NOT NULL DEFAULT now()\n"
        ");\n"
    ).format(schema=sql.Identifier(schema))


def _record(schema: str, m: Migration) -> sql.Composed:
    return sql.SQL("INSERT INTO {}.schema_version (version, name) VALUES ({}, {});\n").format(
        sql.Identifier(schema), sql.Literal(m.version), sql.Literal(m.name)
    )
