"""An idle Celery worker with Celery's defaults sends (almost) nothing.

Celery's worker sends a heartbeat event every 2 s to its event exchange,
where nothing is bound (Celery turns gossip on only for its amqp and redis
transports) while no monitor runs: pgbroker does not send it
(docs/delivery.md, "Routing from a cache"). What remains is the sweep, one
statement per ``sweep_interval`` (10 s by default).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.celery_helpers import wait_until

#: How often pg_stat_activity is read: an idle client sends far fewer.
SAMPLE_INTERVAL = 0.02
#: Seconds within which two starts of one session's statement text are one
#: statement (its Bind and its Execute).
SAME_STATEMENT = 0.25


def sample_statements(admin_url: str, database: str, seconds: float) -> list[tuple[int, str]]:
    """(backend pid, query text) of each statement that a client of
    ``database`` started during ``seconds``: a new ``query_start`` of a
    session is a new statement. One extended-protocol statement sets it
    twice, at Bind and Execute: microseconds apart on an idle machine, over
    5 ms on a loaded one (CI once counted each sweep twice). Starts of one
    text within ``SAME_STATEMENT`` count once: an idle worker repeats a
    statement seconds apart, and a client that repeated one faster would
    still show several per second."""
    seen: dict[tuple[int, str], list[datetime]] = {}
    with psycopg.connect(admin_url, autocommit=True) as admin:
        window_start = admin.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for pid, query, start in admin.execute(
                "SELECT pid, query, query_start FROM pg_stat_activity "
                "WHERE datname = %s AND backend_type = 'client backend' "
                "AND query_start IS NOT NULL",
                [database],
            ).fetchall():
                if start < window_start:
                    continue
                starts = seen.setdefault((pid, query), [])
                if all(abs((start - s).total_seconds()) > SAME_STATEMENT for s in starts):
                    starts.append(start)
            time.sleep(SAMPLE_INTERVAL)
    return [key for key, starts in seen.items() for _ in starts]


@pytest.fixture
def idle_worker(db_url: str, tmp_path: Path) -> Iterator[None]:
    # Celery's default app, configured by the environment only, in an empty
    # directory (no celeryconfig): Celery's defaults, heartbeat and gossip on.
    env = {
        **os.environ,
        "CELERY_BROKER_URL": db_url,
        "C_FORCE_ROOT": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PYTHONPATH", None)
    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            "2",
            "--hostname",
            "idle@%h",
            "--loglevel",
            "INFO",
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: " ready." in (tmp_path / "worker.log").read_text(),
            60,
            "the worker to be ready",
        )
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def test_idle_worker_with_celery_defaults_sends_only_its_sweep(
    idle_worker: None, db_url: str, pg_admin_url: str
) -> None:
    database = urlsplit(db_url).path.lstrip("/")
    time.sleep(5)  # start-up (mingle, first heartbeat and its LISTEN) is over
    window = 21.0
    statements = sample_statements(pg_admin_url, database, window)
    rate = len(statements) / window
    print(f"idle worker: {len(statements)} statements in {window:g} s ({rate:.2f}/s)")
    for pid, query in statements:
        print(f"  {pid}: {' '.join(query.split())[:100]}")
    # Only the sweep: one per sweep_interval (10 s), and no heartbeat (which
    # alone would be 10 statements in this window).
    others = [q for _, q in statements if not q.startswith("/* pgbroker sweep */")]
    assert not others, others
    assert rate <= 0.1 + 1 / window, statements
