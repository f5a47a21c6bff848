"""Round-trip latency of ``add.delay(1, 1).get()``: pgbroker vs Redis.

Runs, in the same process and the same run, against three prefork workers
(``-c 2``) of ``tests.apps.results_app`` (``task_track_started`` on): one
with pgbroker as broker and result backend, one with Redis as both, and one
with a Redis broker and the pgbroker backend (isolating the backend's
share). Blocks of calls alternate between them so that machine noise hits
all alike. Prints p50/p90/p95/p99 in milliseconds.

Then, with no worker, it counts the statements an idle ``get()`` runs while
it waits: the transactions of a scratch database (``xact_commit +
xact_rollback`` of ``pg_stat_database``, read from another database, after
PostgreSQL has flushed its statistics) during ``--idle-seconds`` of a
``get()`` on a task nobody runs. Its LISTEN and its one read run when the
wait starts, before the counted window.

    .venv/bin/python -m compat.latency [--n 300] [--idle-seconds 5] [--pg URL] [--redis URL]

``--pg`` is a server URL where scratch databases may be created (dropped at
the end).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError

from tests import pgserver

ROOT = Path(__file__).resolve().parent.parent
TASK = "tests.apps.results_app.add"


def start_worker(broker: str, backend: str, queue: str) -> subprocess.Popen[str]:
    env = dict(os.environ, RB_BROKER=broker, RB_BACKEND=backend, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("celery")),
            "-A",
            "tests.apps.results_app",
            "worker",
            "-P",
            "prefork",
            "-c",
            "2",
            "-l",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-Q",
            queue,
            "-n",
            f"lat{uuid.uuid4().hex[:6]}@%h",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True).start()
    return proc


def client(broker: str, backend: str) -> Celery:
    app = Celery("latency", broker=broker, backend=backend, set_as_current=False)
    app.conf.broker_transport_options = (
        {"sweep_interval": 0.5} if broker.startswith("postgresql") else {}
    )
    return app


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


#: PostgreSQL flushes a session's statistics at most once a second.
STATS_FLUSH = 1.5


def transactions(admin: psycopg.Connection, dbname: str) -> int:
    row = admin.execute(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", [dbname]
    ).fetchone()
    return int(row[0]) if row else 0


def idle_get_statements(pg_admin: str, seconds: float) -> int:
    """Transactions run in a database with no worker while a get() waits
    ``seconds`` (after its LISTEN and read)."""
    dbname = f"pgbroker_idle_{uuid.uuid4().hex[:8]}"
    pgserver.create_database(pg_admin, dbname)
    url = pgserver.url_for(pg_admin, dbname)
    app = client(url, url)
    try:
        with psycopg.connect(pgserver.libpq_url(pg_admin), autocommit=True) as admin:
            # Set up: schema, pool, LISTEN connection (a first wait).
            with contextlib.suppress(CeleryTimeoutError):
                app.send_task(TASK, (1, 1), queue="nobody").get(timeout=0.2)
            result = app.send_task(TASK, (1, 1), queue="nobody")
            waiter = threading.Thread(
                target=_wait_quietly, args=(result, seconds + 2 * STATS_FLUSH)
            )
            waiter.start()
            time.sleep(STATS_FLUSH)  # the wait's LISTEN and read land before the window
            start = transactions(admin, dbname)
            time.sleep(seconds + STATS_FLUSH)  # what runs in the window is flushed by its end
            end = transactions(admin, dbname)
            waiter.join(seconds + 30)
            return end - start
    finally:
        app.close()
        time.sleep(0.5)
        pgserver.drop_database(pg_admin, dbname)


def _wait_quietly(result: Any, seconds: float) -> None:
    with contextlib.suppress(CeleryTimeoutError):
        result.get(timeout=seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--pg", default=pgserver.LOCAL_URL)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    args = parser.parse_args()

    dbname = f"pgbroker_latency_{uuid.uuid4().hex[:8]}"
    pgserver.create_database(args.pg, dbname)
    pg_url = pgserver.url_for(args.pg, dbname)
    configs = {
        "pgbroker": (pg_url, pg_url),
        "redis": (args.redis, args.redis),
        # Redis broker + pgbroker backend: the backend's share alone.
        "redis+pg": (args.redis, pg_url),
    }
    # Each configuration has its own queue: two of them share a Redis broker.
    queues = {name: f"latency_{i}" for i, name in enumerate(configs)}
    workers = [start_worker(*urls, queues[name]) for name, urls in configs.items()]
    apps = {name: client(*urls) for name, urls in configs.items()}
    samples: dict[str, list[float]] = {name: [] for name in configs}
    try:
        for name, app in apps.items():  # warm up: worker ready, connections open
            for _ in range(20):
                app.send_task(TASK, (1, 1), queue=queues[name]).get(timeout=60)
        block = 25
        for _ in range(max(1, args.n // block)):
            for name, app in apps.items():
                for _ in range(block):
                    started = time.perf_counter()
                    result = app.send_task(TASK, (1, 1), queue=queues[name])
                    assert result.get(timeout=30) == 2
                    samples[name].append((time.perf_counter() - started) * 1000)
    finally:
        for proc in workers:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in workers:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        for app in apps.values():
            app.close()
        time.sleep(0.5)
        pgserver.drop_database(args.pg, dbname)
    print(f"add.delay(1, 1).get() round trip, {len(samples['redis'])} calls each, ms")
    for name, values in samples.items():
        print(
            f"  {name:9s} p50 {percentile(values, 50):6.2f}  p90 {percentile(values, 90):6.2f}"
            f"  p95 {percentile(values, 95):6.2f}  p99 {percentile(values, 99):6.2f}"
            f"  mean {statistics.mean(values):6.2f}"
        )
    if args.idle_seconds > 0:
        idle = idle_get_statements(args.pg, args.idle_seconds)
        print(
            f"idle get() (pgbroker, no worker): {idle} statement(s) in the database during "
            f"{args.idle_seconds + STATS_FLUSH:g} s of waiting, after its LISTEN and its one read"
        )


if __name__ == "__main__":
    main()
