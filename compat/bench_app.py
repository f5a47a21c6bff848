"""The Celery app of the benchmark's workers (``celery -A compat.bench_app worker``).

Configured by the environment only, so that every system runs exactly the
same app and settings, differing only in ``BENCH_BROKER`` / ``BENCH_BACKEND``:
Celery's defaults (JSON, acks before running, prefetch multiplier 4), nothing
tuned for any broker.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery import Celery

app = Celery(
    "bench_app",
    broker=os.environ.get("BENCH_BROKER", "memory://"),
    backend=os.environ.get("BENCH_BACKEND") or None,
)
app.conf.update(broker_connection_retry_on_startup=True)


@app.task
def noop() -> None:
    return None


@app.task
def step(x: int = 0) -> int:
    """One link of a chain: each returns its input plus one."""
    return x + 1


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def xsum(values: list[int]) -> int:
    return sum(values)


@app.task(bind=True, acks_late=True, reject_on_worker_lost=True)
def hold(self: Any, marker: str) -> float:
    """First run: note that it started (the marker file) and run until killed.
    Any later run (a redelivery): return when it started, in epoch seconds."""
    path = Path(marker)
    if not path.exists():
        path.write_text(str(os.getpid()))
        time.sleep(3600)
    return time.time()
