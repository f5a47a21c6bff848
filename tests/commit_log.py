"""Durable commits, recorded by a trigger on every pgbroker table.

A commit is durable when it waits for the WAL flush (synchronous_commit not
off) and its transaction changed a row: the trigger records each
transaction that changes a row, with the synchronous_commit in force at its
first change.
"""

from __future__ import annotations

import psycopg

from tests.celery_helpers import execute


def record_durable_commits(db: psycopg.Connection) -> None:
    db.execute("CREATE TABLE public.commit_log (txid bigint PRIMARY KEY, sync text, first text)")
    db.execute(
        "CREATE FUNCTION public.log_commit() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN INSERT INTO public.commit_log VALUES"
        " (txid_current(), current_setting('synchronous_commit'), TG_OP || ' ' || TG_TABLE_NAME)"
        " ON CONFLICT DO NOTHING;"
        " RETURN NULL; END $$"
    )
    tables = db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'pgbroker'").fetchall()
    for (table,) in tables:
        db.execute(
            psycopg.sql.SQL(
                "CREATE TRIGGER log_commit AFTER INSERT OR UPDATE OR DELETE ON pgbroker.{}"
                " FOR EACH ROW EXECUTE FUNCTION public.log_commit()"
            ).format(psycopg.sql.Identifier(table))
        )


def durable_commits(db_url: str) -> list[str]:
    """The durable transactions, each named by its first change."""
    rows = execute(db_url, "SELECT first FROM public.commit_log WHERE sync <> 'off' ORDER BY txid")
    return [r[0] for r in rows]
