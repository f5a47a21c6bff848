"""libpq URL parameters pass through the broker URL unchanged."""

from __future__ import annotations

import psycopg
from kombu import Connection


def test_application_name_and_connect_timeout_pass_through(
    db_url: str, db: psycopg.Connection
) -> None:
    url = (
        f"{db_url}{'&' if '?' in db_url else '?'}application_name=billing-worker&connect_timeout=7"
    )
    with Connection(url) as conn:
        conn.connect()
        pg = conn.transport._conn
        assert pg is not None
        assert pg.info.get_parameters()["connect_timeout"] == "7"
        rows = db.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'billing-worker'"
        ).fetchone()
        assert rows == (1,)


def test_default_application_name_names_pgbroker(db_url: str, db: psycopg.Connection) -> None:
    with Connection(db_url) as conn:
        conn.connect()
        pg = conn.transport._conn
        assert pg is not None
        name = pg.execute("SHOW application_name").fetchone()
        assert name is not None and name[0].startswith("pgbroker:")


def test_postgres_and_pgbroker_schemes_resolve_to_pgbroker(db_url: str) -> None:
    rest = db_url.split("://", 1)[1]
    for scheme in ("postgresql", "postgres", "pgbroker"):
        with Connection(f"{scheme}://{rest}") as conn:
            assert type(conn.transport).__module__ == "pgbroker.broker.transport"
            conn.connect()
            ch = conn.channel()
            ch.queue_declare(queue="q")
            assert ch._size("q") == 0
