"""Celery end to end, for :mod:`compat.bench`: the same app, the same worker
command and the same client code for every broker/backend pair.

Each pair gets one ``celery -A compat.bench_app worker --pool prefork
--concurrency 2`` (started once, warmed up), and the bench process is the
client. Rounds interleave the pairs (the order rotates), so that noise from
a shared machine hits them alike. Per round and pair:

* tasks/s: ``tasks`` no-op tasks sent with ``send_task`` (as ``delay()``
  does), timed from the first send until every result is in the client
  (``ResultSet.get()``, the backend's native join);
* latency: ``latency_calls`` sequential ``send_task(noop).get()`` round trips;
  the round's p50/p95/p99 (the cell is the median over rounds);
* chains/s: ``chains`` chains of ``chain_length`` ``step`` tasks, all sent,
  timed until every chain's last result is in;
* chord: ``chords`` chords of ``chord_header`` ``add`` tasks and an ``xsum``
  body, one after the other, each timed from ``apply_async`` to the body's
  result (``rpc://`` has no chords: skipped).

The worker-kill figure (:func:`measure_worker_kill`) starts its own workers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery, chain, chord
from celery.result import ResultSet
from kombu import Queue

ROOT = Path(__file__).resolve().parents[1]
NOOP = "compat.bench_app.noop"
STEP = "compat.bench_app.step"
ADD = "compat.bench_app.add"
XSUM = "compat.bench_app.xsum"
HOLD = "compat.bench_app.hold"

#: Longest wait for one result set (a generous bound: a shared, slow machine).
RESULT_TIMEOUT = 300.0


@dataclass(frozen=True)
class Pair:
    """A broker and result backend measured together (a table column)."""

    key: str
    label: str
    broker: str
    backend: str

    @property
    def chords(self) -> bool:
        return not self.backend.startswith("rpc")


@dataclass(frozen=True)
class CelerySizes:
    tasks: int
    latency_calls: int
    chains: int
    chain_length: int
    chord_header: int
    chords: int


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# --- workers and clients ---------------------------------------------------------


class WorkerProcess:
    """One ``celery worker`` in its own process group, output to a log file."""

    def __init__(
        self, pair: Pair, queue: str, workdir: Path, name: str, loglevel: str = "WARNING"
    ) -> None:
        self.log = workdir / f"worker-{name}.log"
        cmd = [
            sys.executable, "-m", "celery", "-A", "compat.bench_app", "worker",
            "--pool", "prefork", "--concurrency", "2", "--loglevel", loglevel,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--queues", queue, "--hostname", f"{name}@%h",
        ]  # fmt: skip
        env = {
            **os.environ,
            # URLs through the environment: no password in `ps`.
            "BENCH_BROKER": pair.broker,
            "BENCH_BACKEND": pair.backend,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self) -> str:
        lines = [line.strip() for line in self.text().splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line]
        return errors[-1][:200] if errors else " | ".join(lines[-3:])[:200]

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait for the "ready." line (needs loglevel INFO)."""
        deadline = time.monotonic() + timeout
        while " ready." not in self.text():
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited ({self.proc.returncode}): {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker not ready after {timeout:.0f} s: {self.tail()}")
            time.sleep(0.1)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            self.proc.wait(10)


def client(pair: Pair) -> Celery:
    app = Celery("bench-client", broker=pair.broker, backend=pair.backend, set_as_current=False)
    app.conf.broker_connection_retry_on_startup = True
    return app


def delete_queues(app: Celery, names: list[str]) -> None:
    with contextlib.suppress(Exception), app.connection_for_write() as conn:
        channel = conn.default_channel
        for name in names:
            with contextlib.suppress(Exception):
                Queue(name)(channel).delete()


# --- measurements ----------------------------------------------------------------


def tasks_per_second(app: Celery, queue: str, n: int) -> float:
    start = time.perf_counter()
    results = [app.send_task(NOOP, queue=queue) for _ in range(n)]
    ResultSet(results, app=app).get(timeout=RESULT_TIMEOUT)
    return n / (time.perf_counter() - start)


def latencies_ms(app: Celery, queue: str, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        app.send_task(NOOP, queue=queue).get(timeout=60)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def chains_per_second(app: Celery, queue: str, n: int, length: int) -> float:
    def one() -> Any:
        links = [app.signature(STEP, args=(0,), queue=queue)]
        links += [app.signature(STEP, queue=queue) for _ in range(length - 1)]
        return chain(*links)

    canvases = [one() for _ in range(n)]
    start = time.perf_counter()
    results = [c.apply_async() for c in canvases]
    values = ResultSet(results, app=app).get(timeout=RESULT_TIMEOUT)
    elapsed = time.perf_counter() - start
    if values != [length] * n:
        raise RuntimeError(f"wrong chain results: {sorted(set(map(str, values)))[:5]}")
    return n / elapsed


def chord_ms(app: Celery, queue: str, header: int) -> float:
    parts = [app.signature(ADD, args=(i, i), queue=queue) for i in range(header)]
    body = app.signature(XSUM, queue=queue)
    start = time.perf_counter()
    value = chord(parts, app=app)(body).get(timeout=RESULT_TIMEOUT)
    elapsed = time.perf_counter() - start
    if value != sum(2 * i for i in range(header)):
        raise RuntimeError(f"wrong chord result {value!r}")
    return elapsed * 1000


@dataclass
class Running:
    pair: Pair
    queue: str
    worker: WorkerProcess
    app: Celery


@contextlib.contextmanager
def running_pairs(
    pairs: list[Pair], prefix: str, workdir: Path, on_error: Callable[[Pair, str], None]
) -> Iterator[list[Running]]:
    """A warmed-up worker and client per pair; a pair that fails to start
    is reported through ``on_error`` and left out."""
    started: list[Running] = []
    try:
        for pair in pairs:
            queue = f"{prefix}.celery.{pair.key}"
            worker = WorkerProcess(pair, queue, workdir, f"{prefix}-{pair.key}", "INFO")
            started.append(Running(pair, queue, worker, client(pair)))
        live = []
        for r in started:
            try:
                r.worker.wait_ready()
                # Warm up: connections open, pool processes forked and importing.
                for _ in range(10):
                    r.app.send_task(NOOP, queue=r.queue).get(timeout=60)
                live.append(r)
            except Exception as exc:
                on_error(r.pair, f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
        yield live
    finally:
        for r in started:
            r.worker.stop()
        for r in started:
            delete_queues(r.app, [r.queue])
            r.app.close()


def measure_worker_kill(
    pair: Pair, prefix: str, tag: str, workdir: Path, phase: float = 0.0
) -> float:
    """Seconds from SIGKILL of a worker (main process and pool, as the OOM
    killer or a node loss would) running an ``acks_late`` task until a
    second, already running worker starts that task again. The kill comes
    ``phase`` seconds after both workers are ready (pgbroker: into the
    surviving worker's sweep cycle, which starts with a sweep at start-up)."""
    queue = f"{prefix}.kill.{pair.key}.{tag}"
    marker = workdir / f"hold-{uuid.uuid4().hex}"
    app = client(pair)
    workers = [
        WorkerProcess(pair, queue, workdir, f"{prefix}-{pair.key}-k{tag}{n}", "INFO") for n in "ab"
    ]
    try:
        for w in workers:
            w.wait_ready()
        ready = time.monotonic()
        time.sleep(0.5)  # let their consumers settle (first sweeps included)
        result = app.send_task(HOLD, args=(str(marker),), queue=queue)
        deadline = time.monotonic() + 60
        while not marker.exists() or not marker.read_text():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no worker started the task: {workers[0].tail()}")
            time.sleep(0.02)
        # The marker holds the pool process's pid: its parent is the worker.
        pool_pid = int(marker.read_text())
        parent = int(Path(f"/proc/{pool_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        holder = next(w for w in workers if w.proc.pid == parent)
        time.sleep(max(0.0, ready + phase - time.monotonic()))
        killed = time.time()
        holder.kill(signal.SIGKILL)
        restarted = float(result.get(timeout=RESULT_TIMEOUT))
        return restarted - killed
    finally:
        for w in workers:
            w.stop()
        delete_queues(app, [queue])
        app.close()
