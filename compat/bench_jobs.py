"""PostgreSQL's CPU per job at a fixed rate: pgbroker beside procrastinate,
for :mod:`compat.bench`'s ``jobs`` part.

procrastinate is a PostgreSQL-only job queue (LISTEN/NOTIFY wake-ups, ``FOR
UPDATE SKIP LOCKED`` claims, a job row updated through its states): the
queue to beat on what PostgreSQL spends per job. Both run the same load on
databases of their own on the same server: one producer sends ``rate`` jobs
a second for ``seconds`` (each its own commit, as a web application sends
them), and ``workers`` consumers take them: for pgbroker, Kombu consumers
with their own sessions (:mod:`compat.bench_listeners`, whose measurement
this is); for procrastinate, one worker process (``python -m
compat.bench_jobs worker``) with ``concurrency = workers``, its defaults
otherwise (finished jobs are kept, as procrastinate does unless told).
The figure is the CPU time of the backends serving the database
(:class:`compat.bench_pool.DatabaseCpu`) from the first job sent until the
last is done, per job. The worker reports progress through a file, so no
session of the bench's polls the database being measured.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from compat import bench_pool

#: The no-op task's name in procrastinate.
TASK = "bench_noop"
#: How often the worker writes its count of jobs done.
PROGRESS_INTERVAL = 0.05


class NotInstalled(Exception):
    pass


def _app(conninfo: str, sync: bool) -> Any:
    try:
        import procrastinate
    except ImportError as exc:
        raise NotInstalled("procrastinate is not installed (pip install -e '.[bench]')") from exc
    connector = (
        procrastinate.SyncPsycopgConnector(conninfo=conninfo)
        if sync
        else procrastinate.PsycopgConnector(conninfo=conninfo)
    )
    return procrastinate.App(connector=connector)


def measure_procrastinate(
    conninfo: str,
    admin: psycopg.Connection[Any],
    dbname: str,
    rate: float,
    seconds: float,
    workers: int,
    workdir: Path,
    tag: str,
) -> tuple[float, int, float]:
    """(server CPU ms per job, sessions closed in the window: not counted,
    the window in seconds) for procrastinate in the empty database
    ``dbname`` (its schema is applied here)."""
    app = _app(conninfo, sync=True)
    task = app.task(name=TASK)(_noop)
    progress = workdir / f"procrastinate-{tag}.count"
    errors = workdir / f"procrastinate-{tag}.err"
    with app.open():
        app.schema_manager.apply_schema()
        with errors.open("w") as err:
            worker = subprocess.Popen(
                [sys.executable, "-m", "compat.bench_jobs", "worker", conninfo, str(workers),
                 str(progress)],
                cwd=bench_pool.ROOT, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
            )  # fmt: skip
        try:
            task.defer(n=-1)  # the worker is up and its sessions are open
            _wait_done(progress, 1, worker, errors)
            time.sleep(0.5)  # let the sessions settle
            cpu = bench_pool.DatabaseCpu(admin, dbname)
            cpu.start()
            started = time.monotonic()
            sent = bench_pool.paced(lambda i: task.defer(n=i), rate, seconds)
            _wait_done(progress, sent + 1, worker, errors)
            used = cpu.seconds()
            window = time.monotonic() - started
        finally:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    return used * 1000 / sent, cpu.gone, window


def _noop(n: int) -> None:
    return None


def _wait_done(progress: Path, total: int, worker: subprocess.Popen[bytes], errors: Path) -> None:
    deadline = time.monotonic() + 120.0
    while True:
        try:
            done = int(progress.read_text() or 0)
        except (FileNotFoundError, ValueError):
            done = 0
        if done >= total:
            return
        if worker.poll() is not None:
            raise RuntimeError(
                f"the procrastinate worker exited ({worker.returncode}): "
                f"{errors.read_text()[-2000:]}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"procrastinate ran {done} of {total} jobs in 120 s")
        time.sleep(PROGRESS_INTERVAL / 2)


def run_worker(conninfo: str, concurrency: int, progress: Path) -> None:
    """The worker process: runs no-op jobs, writing how many it ran."""
    app = _app(conninfo, sync=False)
    done = [0]
    lock = threading.Lock()  # sync tasks run in threads

    @app.task(name=TASK)
    def noop(n: int) -> None:
        with lock:
            done[0] += 1

    def report() -> None:
        written = -1
        while True:
            if done[0] != written:
                written = done[0]
                tmp = progress.with_suffix(".tmp")
                tmp.write_text(str(written))
                os.replace(tmp, progress)
            time.sleep(PROGRESS_INTERVAL)

    threading.Thread(target=report, daemon=True).start()
    app.run_worker(concurrency=concurrency, wait=True, install_signal_handlers=True)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "worker":
        run_worker(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
    else:
        raise SystemExit("usage: python -m compat.bench_jobs worker CONNINFO CONCURRENCY PROGRESS")
