"""Worker hosts on one broker, for :mod:`compat.bench`'s ``hosts`` part: what
one PostgreSQL primary sustains with 1, 4 and 8 hosts' worth of workers, and
how many sessions they hold.

A *host* is one ``celery worker --pool prefork --concurrency 2`` (the
celery part's :class:`compat.bench_celery.WorkerProcess`, with its own
``--hostname``): what one small worker host runs. For a host count and a
broker/backend pair, that many workers consume one queue; once every one is
ready and warmed up, the bench process (one client) sends ``tasks`` no-op
tasks with ``send_task`` (what ``delay()`` does) and waits for every result:
:func:`compat.bench_celery.tasks_per_second`, the celery part's tasks/s.

Over the timed window, from ``/proc`` as the celery part reads it: CPU
seconds of the pair's servers (every process of them), of the workers (each
host's process tree) and of the client (this process); and the whole
machine's busy time (``/proc/stat``), so that what other processes took is
seen ("other"). For pgbroker, the client sessions of the pair's database
are counted every :data:`SAMPLE_INTERVAL` s from ``pg_stat_activity`` and
attributed to a host, or to the client, by the pid at the end of the
``application_name`` pgbroker sets (``pgbroker:<host>:<pid>``,
``pgbroker-sweeper:<host>:<pid>``): the peaks are compared with
docs/production.md's budget of 3 + 4 x concurrency sessions per worker.

Every process runs on the same machine: on 2 cores, 8 hosts' worker
processes compete with PostgreSQL (and the client) for the same cores, so a
figure is what this machine sustains, not what the server alone could.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from celery import Celery
from celery.result import ResultSet

from compat import bench_celery, bench_pool, bench_scale

#: The prefork concurrency of one host (:class:`bench_celery.WorkerProcess`'s).
CONCURRENCY = 2
#: docs/production.md ("Connections: what Celery on pgbroker opens"): the
#: worker's main process holds 3 sessions, each pool process up to 4.
SESSIONS_PER_HOST = 3 + 4 * CONCURRENCY
#: Sessions a no-op task run opens, per host, for the free-connections
#: check: the main process's 3 and each pool process's result backend pool
#: (2; the durable steps' pool opens only for a durable task). 6 were seen
#: (these workers run without heartbeat and events: no publisher session).
EXPECTED_PER_HOST = 3 + 2 * CONCURRENCY
#: The client's sessions (publishing, result backend pool, its listener).
CLIENT_SESSIONS = 4
#: How often ``pg_stat_activity`` is read.
SAMPLE_INTERVAL = 0.2
#: The CPU parts of a measurement (table rows): ``other`` is every other
#: process of the machine over the window (other users of a shared machine).
CPU_PARTS = ("server", "workers", "client", "other")
#: A worker's log line for each task it ran (loglevel INFO).
SUCCEEDED = "] succeeded in "


def session_budget(hosts: int) -> int:
    return hosts * SESSIONS_PER_HOST


@dataclass
class Sessions:
    """Peaks of the sessions open in the pair's database (client backends)."""

    total: int = 0  # every session of the database
    workers: int = 0  # those of the hosts' processes
    client: int = 0  # those of the bench process
    per_host: int = 0  # the most one host held
    samples: int = 0


@dataclass
class Measurement:
    rate: float  # tasks/s
    seconds: float  # the timed window
    #: CPU seconds over the window per part (:data:`CPU_PARTS`); None where unknown.
    cpu: dict[str, float | None]
    #: Why a part's CPU is unknown.
    cpu_errors: dict[str, str]
    #: Cores busy on average over the window, every process of the machine.
    machine_cores: float | None
    #: Tasks each host ran in the window (from its log).
    per_host_tasks: list[int]
    sessions: Sessions | None  # pgbroker only
    server_text: str = ""
    #: pgbroker: CPU seconds of the backends serving the pair's database
    #: only (other clients of a shared server not counted), or why unknown.
    database_cpu: float | None = None
    database_cpu_error: str = ""
    #: Of those backends, how many closed in the window (their CPU is lost).
    database_gone: int = 0


def machine_busy_seconds() -> float | None:
    """CPU seconds every core spent busy since boot (``/proc/stat``), or None."""
    try:
        fields = (bench_celery.PROC / "stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    # user nice system idle iowait irq softirq steal (guest is inside user).
    busy = sum(int(x) for i, x in enumerate(fields[1:9]) if i not in (3, 4))
    return busy / os.sysconf("SC_CLK_TCK")


def cpu_now(run: bench_celery.Running, hosts: list[int]) -> dict[str, float | None]:
    """CPU seconds so far of the servers, the hosts' process trees and the
    client, and the machine's busy seconds (key ``machine``)."""
    client = time.process_time()  # before reading /proc, as bench_celery.cpu_seconds
    machine = machine_busy_seconds()
    if "worker" in run.cpu_errors:  # no /proc
        return {"server": None, "workers": None, "client": client, "machine": machine}
    stats = bench_celery.proc_stats()
    return {
        "server": None if "server" in run.cpu_errors else bench_celery.tree_cpu(stats, run.servers),
        "workers": bench_celery.tree_cpu(stats, hosts),
        "client": client,
        "machine": machine,
    }


def parent_pid(pid: int) -> int | None:
    try:
        stat = (bench_celery.PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


class SessionSampler:
    """Counts the client sessions of one database every :data:`SAMPLE_INTERVAL`
    s (from the admin database, on a thread of its own) and keeps the peaks,
    attributing each session to a host (the worker's main process or one of
    its pool processes) or to this process by the pid in its
    ``application_name``."""

    def __init__(self, admin_url: str, dbname: str, hosts: list[int]) -> None:
        self.admin_url = admin_url
        self.dbname = dbname
        self.hosts = hosts
        self.peaks = Sessions()
        self.error: BaseException | None = None
        self._owner: dict[int, int | None] = {h: h for h in hosts}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="session-sampler", daemon=True)
        self._conn: psycopg.Connection[Any] | None = None

    def __enter__(self) -> SessionSampler:
        self._conn = psycopg.connect(
            "postgresql://" + self.admin_url.partition("://")[2], autocommit=True, connect_timeout=5
        )
        self.sample()  # the first one before the window opens
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            if self.error is None:
                self.sample()  # and the last one after it closes
        finally:
            if self._conn is not None:
                self._conn.close()
        if self.error is not None:
            raise RuntimeError(f"session sampler failed: {self.error}") from self.error

    def _run(self) -> None:
        try:
            while not self._stop.wait(SAMPLE_INTERVAL):
                self.sample()
        except BaseException as exc:  # reported by __exit__
            self.error = exc

    def owner(self, pid: int) -> int | None:
        """The host (its main process's pid) that process ``pid`` belongs to."""
        if pid not in self._owner:
            parent = parent_pid(pid)
            self._owner[pid] = parent if parent in self.hosts else None
        return self._owner[pid]

    def sample(self) -> None:
        assert self._conn is not None
        rows = self._conn.execute(
            "SELECT application_name, count(*) FROM pg_stat_activity"
            " WHERE datname = %s AND backend_type = 'client backend' GROUP BY 1",
            [self.dbname],
        ).fetchall()
        me = os.getpid()
        total, client = 0, 0
        by_host = dict.fromkeys(self.hosts, 0)
        for name, count in rows:
            total += count
            tail = str(name or "").rpartition(":")[2]
            pid = int(tail) if tail.isdigit() else None
            if pid == me:
                client += count
            elif pid is not None and (host := self.owner(pid)) is not None:
                by_host[host] += count
        p = self.peaks
        p.samples += 1
        p.total = max(p.total, total)
        p.client = max(p.client, client)
        p.workers = max(p.workers, sum(by_host.values()))
        p.per_host = max(p.per_host, *by_host.values())


def succeeded(worker: bench_celery.WorkerProcess) -> int:
    return worker.text().count(SUCCEEDED)


def warm_up(app: Celery, queue: str, hosts: int) -> None:
    """Connections open, pool processes forked and importing: 10 round trips
    per host (sent together, so that they spread over the hosts)."""
    results = [app.send_task(bench_celery.NOOP, queue=queue) for _ in range(10 * hosts)]
    ResultSet(results, app=app).get(timeout=bench_celery.RESULT_TIMEOUT)


def free_connections_check(url: str, hosts: int) -> None:
    """Raise :class:`NotEnoughConnections` when the server cannot take the
    hosts' and the client's sessions and still leave others room."""
    free = bench_scale.free_connections(url)
    need = hosts * EXPECTED_PER_HOST + CLIENT_SESSIONS + bench_scale.CONNECTION_HEADROOM
    if free < need:
        raise NotEnoughConnections(
            f"{hosts} hosts need about {need} free connections (with "
            f"{bench_scale.CONNECTION_HEADROOM} left to others), the server has {free}"
        )


class NotEnoughConnections(Exception):
    pass


@dataclass
class Hosts:
    """``hosts`` workers of one pair on one queue, and a client."""

    pair: bench_celery.Pair
    queue: str
    workers: list[bench_celery.WorkerProcess]
    app: Celery
    run: bench_celery.Running = field(init=False)

    def __post_init__(self) -> None:
        # The celery part's view of a pair, for its servers' processes.
        self.run = bench_celery.Running(self.pair, self.queue, self.workers[0], self.app)

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]


@contextlib.contextmanager
def started(
    pair: bench_celery.Pair, hosts: int, prefix: str, tag: str, workdir: Path
) -> Iterator[Hosts]:
    """Start ``hosts`` workers on one queue (all at once), wait until every
    one is ready, warm them up; stop them (all at once) and delete the queue
    on the way out."""
    queue = f"{prefix}.hosts.{tag}"
    app = bench_celery.client(pair)
    workers: list[bench_celery.WorkerProcess] = []
    try:
        for i in range(hosts):
            name = f"{prefix}-{tag}-h{i}"
            workers.append(bench_celery.WorkerProcess(pair, queue, workdir, name, "INFO"))
        for w in workers:
            w.wait_ready()
        warm_up(app, queue, hosts)
        h = Hosts(pair, queue, workers, app)
        h.run.find_servers()
        yield h
    finally:
        for w in workers:  # SIGTERM to all first: they shut down side by side
            w.kill(signal.SIGTERM)
        for w in workers:
            w.stop()
        bench_celery.delete_queues(app, [queue])
        app.close()


def measure(h: Hosts, tasks: int, admin_url: str | None, dbname: str | None) -> Measurement:
    """One timed run of ``tasks`` no-op tasks on running hosts. With
    ``admin_url`` and ``dbname`` (pgbroker), the sessions are sampled too."""
    sampler: SessionSampler | None = None
    done_before = [succeeded(w) for w in h.workers]
    database: bench_pool.DatabaseCpu | None = None
    database_cpu, database_error = None, ""
    with contextlib.ExitStack() as stack:
        if admin_url and dbname:
            sampler = stack.enter_context(SessionSampler(admin_url, dbname, h.pids))
            admin = stack.enter_context(
                psycopg.connect(
                    "postgresql://" + admin_url.partition("://")[2],
                    autocommit=True,
                    connect_timeout=5,
                )
            )
            database = bench_pool.DatabaseCpu(admin, dbname)
            try:
                database.start()
            except bench_pool.CpuUnavailable as exc:
                database, database_error = None, str(exc)
        before = cpu_now(h.run, h.pids)
        start = time.perf_counter()
        rate = bench_celery.tasks_per_second(h.app, h.queue, tasks)
        seconds = time.perf_counter() - start
        after = cpu_now(h.run, h.pids)
        if database is not None:
            try:
                database_cpu = database.seconds()
            except bench_pool.CpuUnavailable as exc:
                database_error = str(exc)
    for w in h.workers:
        if w.proc.poll() is not None:
            raise RuntimeError(f"a worker exited during the run: {w.tail()}")
    cpu: dict[str, float | None] = {}
    for part in ("server", "workers", "client"):
        b, a = before[part], after[part]
        cpu[part] = None if a is None or b is None else a - b
    ours = [v for p in ("server", "workers", "client") if (v := cpu[p]) is not None]
    mb, ma = before["machine"], after["machine"]
    machine = None if ma is None or mb is None else ma - mb
    # What the rest of the machine took (other users of a shared machine);
    # 10 ms ticks: a short window can read a little below zero.
    cpu["other"] = None if machine is None or len(ours) < 3 else max(0.0, machine - sum(ours))
    errors = {("workers" if k == "worker" else k): v for k, v in h.run.cpu_errors.items()}
    if machine is None:
        errors["other"] = "no /proc/stat"
    elif "other" not in errors and cpu["other"] is None:
        errors["other"] = "not every part measured"
    # Log lines are written after the result is stored: let them land.
    time.sleep(0.5)
    per_host = [succeeded(w) - b for w, b in zip(h.workers, done_before, strict=True)]
    return Measurement(
        rate=rate,
        seconds=seconds,
        cpu=cpu,
        cpu_errors=errors,
        machine_cores=None if machine is None else machine / seconds,
        per_host_tasks=per_host,
        sessions=sampler.peaks if sampler else None,
        server_text=h.run.server_text,
        database_cpu=database_cpu,
        database_cpu_error=database_error,
        database_gone=database.gone if database is not None else 0,
    )
