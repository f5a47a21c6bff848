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

For the tasks/s and chains/s runs, :func:`cpu_seconds` gives the CPU time
of the pair's servers and of its worker (from ``/proc``) and of the client
(its own process clock) over
the timed window: what limits each system on a CPU-bound machine.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from celery import Celery, chain, chord
from celery.result import ResultSet
from kombu import Exchange, Queue

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
            # The queue as Celery declared it (an exchange of its name), declared
            # again first: Redis deletes only the bindings this connection
            # knows of, and keeps an exchange's bindings in a key of its own.
            queue = Queue(name, Exchange(name), routing_key=name)(channel)
            with contextlib.suppress(Exception):
                queue.declare()
                queue.delete()
            with contextlib.suppress(Exception):
                queue.exchange.delete()


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


def delay_rate(app: Celery, queue: str, n: int) -> float:
    """``delay()`` calls per second of one client sending ``n`` no-op tasks
    as fast as it can while the worker runs them (what a web application
    feels). Only the sends are timed; the results are then awaited
    (untimed), so the next measurement starts with an idle worker."""
    start = time.perf_counter()
    results = [app.send_task(NOOP, queue=queue) for _ in range(n)]
    elapsed = time.perf_counter() - start
    ResultSet(results, app=app).get(timeout=RESULT_TIMEOUT)
    return n / elapsed


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


# --- CPU time (Linux /proc) --------------------------------------------------------

PROC = Path("/proc")
#: The parts of a pair whose CPU time is measured (table rows).
CPU_PARTS = ("server", "worker", "client")


class CpuUnavailable(Exception):
    pass


def proc_stats() -> dict[int, list[str]]:
    """Every process's ``/proc/<pid>/stat`` fields after the command name:
    [1] is the parent pid, [11:15] utime, stime, cutime, cstime in ticks."""
    stats = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):  # exited since listed
                stats[int(entry.name)] = (entry / "stat").read_text().rsplit(")", 1)[1].split()
    return stats


def tree_cpu(stats: dict[int, list[str]], roots: list[int]) -> float:
    """CPU seconds of ``roots`` and all their descendants, including the
    children they have reaped (cutime, cstime): a process that exits between
    two samples is counted by its parent's cutime instead, so the difference
    of two samples is complete as long as the roots live."""
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(pid)
    ticks, todo, seen = 0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        ticks += sum(int(x) for x in stats[pid][11:15])
        todo += children.get(pid, [])
    return ticks / os.sysconf("SC_CLK_TCK")


def comm(pid: int) -> str:
    try:
        return (PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def read_cmdline(pid: int) -> bytes:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def server_processes(url: str) -> tuple[list[int], str]:
    """The local server behind ``url``: the roots of its process trees, and
    a description. Raises :class:`CpuUnavailable` when it is not a local
    process (a remote host, another pid namespace)."""
    scheme = urlsplit(url).scheme
    if scheme == "rpc":
        return [], ""  # the broker's own server
    if scheme.startswith(("postgres", "pgbroker")):
        with psycopg.connect(
            "postgresql://" + url.partition("://")[2], autocommit=True, connect_timeout=5
        ) as conn:
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
            # Every server process is a child of the postmaster, this backend's parent.
            stat = (PROC / str(backend) / "stat").read_text() if comm(backend) == "postgres" else ""
        if not stat:
            raise CpuUnavailable("PostgreSQL is not a local process")
        postmaster = int(stat.rsplit(")", 1)[1].split()[1])
        return [postmaster], f"PostgreSQL (postmaster {postmaster} and its children)"
    if scheme.startswith("redis"):
        import redis

        pid = int(redis.Redis.from_url(url, socket_timeout=5).info("server")["process_id"])
        if comm(pid) != "redis-server":
            raise CpuUnavailable("Redis is not a local process")
        return [pid], f"redis-server {pid}"
    if scheme.startswith("amqp"):
        # RabbitMQ does not tell its pid over AMQP: its Erlang VM on this host.
        pids = [
            pid
            for pid in map(int, filter(str.isdigit, os.listdir(PROC)))
            if comm(pid) == "beam.smp" and b"rabbit" in read_cmdline(pid)
        ]
        if not pids:
            raise CpuUnavailable("RabbitMQ is not a local process")
        return pids, f"RabbitMQ beam.smp {', '.join(map(str, pids))}"
    raise CpuUnavailable(f"unknown server for {scheme}://")


@dataclass
class Running:
    pair: Pair
    queue: str
    worker: WorkerProcess
    app: Celery
    #: Roots of the process trees of the pair's broker and backend servers.
    servers: list[int] = field(default_factory=list)
    #: What ``servers`` are.
    server_text: str = ""
    #: Why a CPU part cannot be measured (part -> reason).
    cpu_errors: dict[str, str] = field(default_factory=dict)

    def find_servers(self) -> None:
        if not (PROC / "self" / "stat").exists():
            self.cpu_errors = dict.fromkeys(CPU_PARTS, "no /proc on this platform")
            return
        texts = []
        try:
            for url in dict.fromkeys([self.pair.broker, self.pair.backend]):
                pids, text = server_processes(url)
                self.servers += [p for p in pids if p not in self.servers]
                texts += [text] if text else []
        except Exception as exc:
            self.cpu_errors["server"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        self.server_text = " + ".join(texts)


def cpu_seconds(run: Running) -> dict[str, float | None]:
    """CPU seconds used so far by the pair's servers (every process, their
    other clients included), its worker (the ``celery worker`` process and
    its pool) and the client (this process, every thread); None where
    unknown (``run.cpu_errors`` says why)."""
    if len(run.cpu_errors) == len(CPU_PARTS):
        return dict.fromkeys(CPU_PARTS)
    # The client's own clock, in nanoseconds (/proc counts 10 ms ticks, and
    # a Redis client's 50 --quick tasks could read 0), read before
    # proc_stats() so that reading /proc is not charged to the client.
    client = time.process_time()
    stats = proc_stats()
    return {
        "server": None if "server" in run.cpu_errors else tree_cpu(stats, run.servers),
        "worker": tree_cpu(stats, [run.worker.proc.pid]),
        "client": client,
    }


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
                r.find_servers()
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
