"""Numbered migrations, recorded in ``<schema>.schema_version``.

Each file ``migrations/NNN_name.sql`` is applied in its own transaction
together with its version row, so a failing migration leaves no trace and
does not bump the version. Concurrent migrators (many workers starting at
once) are serialised by a transaction advisory lock, and the one that
waited finds the work done.
"""

from __future__ import annotations

import dataclasses
import re
from importlib import resources

import psycopg
from psycopg import sql

from pgbroker.errors import SchemaError

_FILE = re.compile(r"^(\d{3})_(\w+)\.sql$")


@dataclasses.dataclass(frozen=True)
class Migration:
    version: int
    name: str
    text: str

    def statement(self, schema: str) -> sql.Composed:
        return sql.SQL(self.text).format(schema=sql.Identifier(schema))  # type: ignore[arg-type]


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
    row = conn.execute(
        "SELECT to_regclass(format('%%I.schema_version', %s::text)) IS NOT NULL", [schema]
    ).fetchone()
    if not row or not row[0]:
        return None
    q = sql.SQL("SELECT coalesce(max(version), 0) FROM {}.schema_version").format(
        sql.Identifier(schema)
    )
    result = conn.execute(q).fetchone()
    return int(result[0]) if result else 0


def pending_sql(conn: psycopg.Connection, schema: str) -> str:
    """The SQL ``migrate`` would run, for a DBA to read or run by hand."""
    version = current_version(conn, schema) or 0
    chunks = [_preamble(schema).as_string(conn)]
    for m in migrations():
        if m.version > version:
            chunks.append(f"-- {m.version:03d}_{m.name}\n" + m.statement(schema).as_string(conn))
            chunks.append(_record(schema, m).as_string(conn))
    return "\n".join(chunks)


def migrate(conn: psycopg.Connection, schema: str) -> list[Migration]:
    """Bring ``schema`` to the latest version; return what was applied."""
    wanted = latest_version()
    if current_version(conn, schema) == wanted:
        return []  # the common case: no lock, one cheap query
    applied = []
    try:
        with conn.transaction():
            # Serialise migrators of this schema; the key is derived from the
            # schema name so that two pgbroker schemas do not block each other.
            conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('pgbroker.migrate'), hashtext(%s))",
                [schema],
            )
            conn.execute(_preamble(schema))
            version = current_version(conn, schema) or 0
            for m in migrations():
                if m.version <= version:
                    continue
                with conn.transaction():  # a savepoint: one migration, one version row
                    conn.execute(m.statement(schema))
                    conn.execute(_record(schema, m))
                applied.append(m)
    except psycopg.errors.InsufficientPrivilege as exc:
        user = conn.info.user
        raise SchemaError(
            f"role {user!r} may not create pgbroker's schema {schema!r} "
            f"({exc.diag.message_primary}). Either grant it "
            f"(GRANT CREATE ON DATABASE {conn.info.dbname} TO {user}), or have an owner run "
            "`pgbroker migrate` once and set the option auto_migrate=False."
        ) from None
    return applied


def require_current(conn: psycopg.Connection, schema: str) -> None:
    """Raise a clear error unless the schema is at the latest version."""
    version = current_version(conn, schema)
    wanted = latest_version()
    if version == wanted:
        return
    if version is None:
        state = f"schema {schema!r} has no pgbroker tables"
    elif version > wanted:
        raise SchemaError(
            f"schema {schema!r} is at version {version}, newer than this pgbroker "
            f"(knows {wanted}): upgrade the pgbroker package"
        )
    else:
        state = f"schema {schema!r} is at version {version}, pgbroker needs {wanted}"
    raise SchemaError(
        f"{state}: run `pgbroker migrate --url URL --schema {schema}` "
        "or enable the auto_migrate transport option"
    )


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
