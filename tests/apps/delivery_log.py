"""The ``run_log`` table of the delivery tests: one row per run of a task of
tests/apps/delivery_app.py, written by the task itself, so a test sees every
run, including those of workers it killed."""

from __future__ import annotations

import psycopg

from tests.celery_helpers import execute

RUN_LOG = (
    "CREATE TABLE run_log (id bigserial PRIMARY KEY, name text NOT NULL, key text NOT NULL, "
    "pid int NOT NULL, at double precision NOT NULL)"
)


def setup_run_log(db: psycopg.Connection) -> None:
    db.execute(RUN_LOG)


def runs(db_url: str, name: str, key: str) -> list[tuple[int, float]]:
    """(pid, time) of every run of task ``name`` with ``key``, in order."""
    rows = execute(
        db_url, "SELECT pid, at FROM run_log WHERE name = %s AND key = %s ORDER BY id", (name, key)
    )
    return [(int(p), float(a)) for p, a in rows]
