"""Chord completion time: pgbroker vs Redis.

A chord of ``--header`` trivial tasks (``add``) and a body (``xsum``), timed
from ``apply_async`` to the body's result in the client, on prefork workers
(``-c 2``) of ``tests.apps.results_app`` with ``task_track_started`` on. Three
configurations in the same run: pgbroker as broker and result backend,
Redis as both, and a Redis broker with the pgbroker backend. Runs alternate
between configurations so that machine noise hits them alike. Prints the
median, the fastest and the slowest run in milliseconds.

    .venv/bin/python -m compat.chord_bench [--header 100] [--runs 7]

``--pg`` is a server URL where a scratch database may be created (dropped
at the end).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import time
import uuid

from celery import Celery, chord

from compat.latency import client, start_worker
from tests import pgserver

ADD = "tests.apps.results_app.add"
XSUM = "tests.apps.results_app.xsum"


def run_chord(app: Celery, queue: str, size: int) -> float:
    """Seconds from apply_async to the body's result."""
    header = [app.signature(ADD, (i, i), queue=queue) for i in range(size)]
    body = app.signature(XSUM, queue=queue)
    started = time.perf_counter()
    result = chord(header, app=app)(body)
    value = result.get(timeout=120)
    elapsed = time.perf_counter() - started
    assert value == sum(2 * i for i in range(size)), value
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--header", type=int, default=100, help="header tasks per chord")
    parser.add_argument("--runs", type=int, default=7, help="chords per configuration")
    parser.add_argument("--pg", default=pgserver.LOCAL_URL)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    args = parser.parse_args()

    dbname = f"pgbroker_chord_{uuid.uuid4().hex[:8]}"
    pgserver.create_database(args.pg, dbname)
    pg_url = pgserver.url_for(args.pg, dbname)
    configs = {
        "pgbroker": (pg_url, pg_url),
        "redis": (args.redis, args.redis),
        "redis+pg": (args.redis, pg_url),
    }
    queues = {name: f"chord_{uuid.uuid4().hex[:6]}_{i}" for i, name in enumerate(configs)}
    workers = [start_worker(*urls, queues[name]) for name, urls in configs.items()]
    apps = {name: client(*urls) for name, urls in configs.items()}
    samples: dict[str, list[float]] = {name: [] for name in configs}
    try:
        for name, app in apps.items():  # warm up: workers ready, connections open
            run_chord(app, queues[name], 5)
        for _ in range(args.runs):
            for name, app in apps.items():
                samples[name].append(run_chord(app, queues[name], args.header) * 1000)
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
    print(f"chord of {args.header} add tasks + xsum body, {args.runs} runs each, ms")
    for name, values in samples.items():
        print(
            f"  {name:9s} median {statistics.median(values):8.1f}  min {min(values):8.1f}"
            f"  max {max(values):8.1f}"
        )


if __name__ == "__main__":
    main()
