"""examples/transactional: each integration (psycopg, SQLAlchemy, Django)
runs against a real worker and prints what its README promises: a committed
order's task runs (and sees the order), a rolled-back order's task never
exists, and no task is visible to workers before its commit."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.celery_helpers import add_user_data, database_contents, with_password

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "transactional"

EXPECTED = [
    'schema: "pgbroker_transactional" (the example\'s own)',
    "worker ready",
    "order 1: before commit, 0 message(s) visible to workers",
    "order 1 committed with its task",
    "send_order_email(1) = mail to alice for order 1",
    "order 2: before commit, 0 message(s) visible to workers",
    "order 2 rolled back: 0 message(s) for its task",
    "order 3: before commit, 0 message(s) visible to workers",
    "order 3 committed with its task",
    "send_order_email(3) = mail to carol for order 3",
    "emails sent for orders: [1, 3]",
    'dropped schema "pgbroker_transactional"',
    "done",
]


def run_example(script: str, env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
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


@pytest.mark.parametrize(
    ("script", "needs"),
    [
        ("run_psycopg.py", None),
        ("run_sqlalchemy.py", "sqlalchemy"),
        ("run_django.py", "django"),
    ],
)
def test_transactional_example(db_url: str, script: str, needs: str | None) -> None:
    if needs and importlib.util.find_spec(needs) is None:
        pytest.skip(f"{needs} not installed (pip install {needs})")
    # The user's own shop_order and shop_email in public, pgbroker schema and
    # queued message are as they were: the example has a schema of its own.
    add_user_data(db_url)
    before = database_contents(db_url)
    url, password = with_password(db_url)
    output = run_example(script, {**os.environ, "PGBROKER_URL": url})
    assert "(from PGBROKER_URL)" in output
    assert password not in output
    assert database_contents(db_url) == before
