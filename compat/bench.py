"""pgbroker beside Redis and RabbitMQ, measured in one run with the same settings.

    python -m compat.bench                      # full size: about 4 minutes
    python -m compat.bench --quick              # tiny sizes, a smoke test
    python -m compat.bench --messages 10000 --rounds 3 --idle-seconds 60 --json out.json

Figures (compat/README.md says how each is taken and what it does not say):

1. Kombu publish rate: one producer, persistent messages of about 200 bytes
   of JSON through a durable direct exchange. RabbitMQ runs with publisher
   confirms, so that for every system ``publish()`` returns once the broker
   has the message (pgbroker: committed; Redis: in memory, then its own
   appendfsync policy).
2. Kombu consume rate: one consumer acking every message, the same
   prefetch_count for every system, from the queue just filled by (1).
3. Idle query rate (pgbroker only): an idle Kombu consumer and an idle
   ``celery worker`` (prefork, 2 processes), each alone in its own fresh
   database, for ``--idle-seconds``. Queries are counted as the delta of
   ``pg_stat_database.xact_commit + xact_rollback`` (every pgbroker statement
   is its own transaction). The sampler reads the counters from the admin
   database, so its own queries are not counted; a third database with no
   client at all shows the server's background (autovacuum visits).
4. Redelivery after SIGKILL: a child process holds unacked messages, a
   second consumer waits, the child is SIGKILLed, and the time until the
   waiting consumer has every message is measured. For pgbroker this
   depends on where in its sweep cycle the kill falls, so round i kills at
   (i + 0.5) / rounds of the sweep interval: the median is the typical
   delay, the maximum approaches the worst case. Redis's figure is its
   configured visibility timeout, not waited for.

Systems are interleaved in every round (the order rotates), and each table
cell is the median over rounds. A system that cannot be reached is "n/a".
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from kombu import Connection, Consumer, Exchange, Producer, Queue
from psycopg import sql

from pgbroker import schema

ROOT = Path(__file__).resolve().parents[1]

PG_SETTINGS = ("synchronous_commit", "fsync", "wal_sync_method", "shared_buffers")

#: Longest wait for any single step (a message, a child starting) before the
#: measurement is abandoned and reported as failed.
STEP_TIMEOUT = 60.0


# --- results ----------------------------------------------------------------


@dataclass
class Cell:
    """One system's figure: measured values, or a configured value, or an error."""

    values: list[float] = field(default_factory=list)
    configured: float | None = None
    note: str = ""
    error: str = ""

    def value(self) -> float | None:
        if self.configured is not None:
            return self.configured
        return statistics.median(self.values) if self.values else None


@dataclass
class Figure:
    key: str
    label: str
    systems: tuple[str, ...]  # the systems this figure applies to
    cells: dict[str, Cell] = field(default_factory=dict)

    def cell(self, system: str) -> Cell:
        return self.cells.setdefault(system, Cell())


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


SYSTEM_LABELS = {"pgbroker": "pgbroker", "redis": "Redis", "rabbitmq": "RabbitMQ"}


class BenchError(Exception):
    pass


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
    pg_admin_url: str
    redis_url: str
    amqp_url: str
    systems: tuple[str, ...]
    json_path: str | None


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(
        prog="python -m compat.bench",
        description="Benchmark pgbroker beside Redis and RabbitMQ (see compat/README.md).",
    )
    p.add_argument("--messages", type=int, help="messages per round (default 10000)")
    p.add_argument("--rounds", type=int, help="rounds; cells are medians (default 3)")
    p.add_argument("--prefetch", type=int, default=100, help="consumer prefetch_count")
    p.add_argument("--body-bytes", type=int, default=200, help="JSON body size")
    p.add_argument("--idle-seconds", type=float, help="idle window (default 60)")
    p.add_argument(
        "--idle-warmup",
        type=float,
        help="wait after start-up before the idle window, so start-up queries are "
        "flushed into pg_stat_database (default 15 s)",
    )
    p.add_argument(
        "--sweep-intervals",
        help="pgbroker sweep_interval values for the redelivery figure (default 10,1)",
    )
    p.add_argument("--hold", type=int, default=10, help="unacked messages held when killed")
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
        "--quick", action="store_true", help="tiny sizes, a few seconds per phase (for tests)"
    )
    a = p.parse_args(argv)
    quick = a.quick
    systems = tuple(s.strip() for s in a.systems.split(",") if s.strip())
    unknown = set(systems) - set(SYSTEM_LABELS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; choose from {sorted(SYSTEM_LABELS)}")
    sweeps = a.sweep_intervals or ("1" if quick else "10,1")
    return Settings(
        messages=a.messages or (100 if quick else 10000),
        rounds=a.rounds or (2 if quick else 3),
        prefetch=a.prefetch,
        body_bytes=a.body_bytes,
        idle_seconds=a.idle_seconds if a.idle_seconds is not None else (2.0 if quick else 60.0),
        idle_warmup=a.idle_warmup if a.idle_warmup is not None else (0.5 if quick else 15.0),
        sweep_intervals=tuple(float(x) for x in sweeps.split(",")),
        hold=a.hold,
        pg_admin_url=a.pg_admin_url,
        redis_url=a.redis_url,
        amqp_url=a.amqp_url,
        systems=systems,
        json_path=a.json_path,
    )


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


def probe(system: System) -> None:
    """Set ``system.error`` when the system cannot be reached."""
    try:
        with system.connect() as conn:
            conn.ensure_connection(max_retries=1, timeout=10)
            conn.default_channel  # noqa: B018 - opens a channel: the real test
    except Exception as exc:
        system.error = error_text(exc)


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
        info["server_version"] = str(conn.info.server_version)
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
        queue(conn.channel()).delete()


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


def measure_idle(
    dbs: Databases, s: Settings, prefix: str, workdir: Path
) -> dict[str, tuple[float, int]]:
    """Queries per second (and connected sessions) of an idle Kombu consumer
    and an idle celery worker, each alone in a fresh database, and of a
    database with no client (the server's background: autovacuum visits)."""
    keys = ("idle_kombu", "idle_celery", "idle_none")
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
    with (
        child(child_command("idle"), kombu_env, workdir, "idle-kombu") as consumer,
        child(celery_cmd, celery_env, celery_dir, "idle-celery") as worker,
    ):
        consumer.wait_for("ready", STEP_TIMEOUT)
        worker.wait_for(" ready.", 2 * STEP_TIMEOUT)
        # Backends report their counters when they go idle, at most once a
        # second and at the latest 10 s later: let start-up bursts land.
        time.sleep(s.idle_warmup)
        with dbs.admin() as admin:
            before = xact_counts(admin, list(names.values()))
            start = time.monotonic()
            time.sleep(s.idle_seconds)
            after = xact_counts(admin, list(names.values()))
            elapsed = time.monotonic() - start
        for c in (consumer, worker):
            if c.proc.poll() is not None:
                raise BenchError(f"an idle process exited during the window: {c.tail()}")
        worker.stop(signal.SIGTERM)
    return {
        key: ((after[db][0] - before[db][0]) / elapsed, after[db][1]) for key, db in names.items()
    }


# --- the run ------------------------------------------------------------------


@dataclass
class Report:
    settings: Settings
    systems: list[System]
    figures: dict[str, Figure]
    environment: dict[str, Any]

    def live(self) -> list[System]:
        return [x for x in self.systems if not x.error]

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": {k: v for k, v in vars(self.settings).items() if not k.endswith("_url")},
            "environment": self.environment,
            "systems": {x.key: {"label": x.label, "error": x.error} for x in self.systems},
            "figures": {
                f.key: {
                    "label": f.label,
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
                for f in self.figures.values()
            },
        }


def make_figures(s: Settings) -> dict[str, Figure]:
    brokers = ("pgbroker", "redis", "rabbitmq")
    figures = [
        Figure("publish", "publish msg/s (1 producer, persistent)", brokers),
        Figure("consume", f"consume+ack msg/s (1 consumer, prefetch {s.prefetch})", brokers),
        Figure("idle_kombu", "idle queries/s: Kombu consumer", ("pgbroker",)),
        Figure("idle_celery", "idle queries/s: celery worker -c 2", ("pgbroker",)),
    ]
    for interval in s.sweep_intervals:
        label = f"redelivery after SIGKILL, s (pgbroker sweep_interval={interval:g})"
        figures.append(Figure(f"redelivery_{interval:g}", label, brokers))
    return {f.key: f for f in figures}


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
        },
    )
    with tempfile.TemporaryDirectory(prefix="pgbroker-bench-") as tmp:
        workdir = Path(tmp)
        try:
            prepare_systems(report, dbs)
            run_throughput(report, prefix)
            run_redelivery(report, prefix, workdir)
            run_idle(report, dbs, prefix, workdir)
        finally:
            for system in report.live():
                with contextlib.suppress(Exception), system.connect() as conn:
                    Exchange(prefix, type="direct")(conn.channel()).delete()
            dbs.drop_all()
    report.environment["loadavg_end"] = list(os.getloadavg())
    return report


def prepare_systems(report: Report, dbs: Databases) -> None:
    """Create pgbroker's database, find which systems answer, note their settings."""
    for system in report.systems:
        if system.key == "pgbroker":
            try:
                report.environment["postgresql"] = pg_environment(dbs.admin_url)
                system.url = dbs.create()
            except psycopg.Error as exc:
                system.error = error_text(exc)
        if not system.error:
            probe(system)
        if system.error:
            log(f"{system.label}: not reachable, skipped ({system.error})")
            for f in report.figures.values():
                if system.key in f.systems:
                    f.cell(system.key).error = "not reachable"
    report.environment.update(other_environment(report.live()))


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
    kombu, celery = (
        report.figures["idle_kombu"].cell("pgbroker"),
        report.figures["idle_celery"].cell("pgbroker"),
    )
    idle = attempt(
        [kombu, celery], functools.partial(measure_idle, dbs, s, prefix, workdir), "idle"
    )
    if idle:
        kombu.values.append(idle["idle_kombu"][0])
        celery.values.append(idle["idle_celery"][0])
        report.environment["idle_sessions"] = {k: v[1] for k, v in idle.items()}
        report.environment["idle_background_queries_per_s"] = idle["idle_none"][0]


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


def render(report: Report) -> str:
    s, figures, systems, env = report.settings, report.figures, report.systems, report.environment
    lines = []
    pg = env.get("postgresql")
    if pg:
        lines.append(
            f"PostgreSQL {pg['server_version']}: " + ", ".join(f"{k}={pg[k]}" for k in PG_SETTINGS)
        )
    if "redis" in env:
        r = env["redis"]
        lines.append(
            f"Redis {r['version']}: appendonly={r.get('appendonly')}, "
            f"appendfsync={r.get('appendfsync')}"
        )
    if "rabbitmq" in env:
        lines.append(f"RabbitMQ {env['rabbitmq']['version']}: publisher confirms on")
    lines.append(
        f"machine: {env['cpu_count']} cores, load average {env['loadavg_start'][0]:.2f} at start, "
        f"{env['loadavg_end'][0]:.2f} at end (shared machine: figures are noisy)"
    )
    lines.append(
        f"sizes: {s.messages} messages x {s.rounds} rounds, body {s.body_bytes} bytes JSON, "
        f"prefetch {s.prefetch}, idle window {s.idle_seconds:g} s, {s.hold} messages held"
    )
    lines.append("")

    header = ["figure", *(SYSTEM_LABELS[k] for k in ("pgbroker", "redis", "rabbitmq"))]
    header.append("pgbroker/Redis")
    rows = [header]
    chosen = {x.key for x in systems}
    for f in figures.values():
        row = [f.label]
        for key in ("pgbroker", "redis", "rabbitmq"):
            if key not in f.systems or key not in chosen:
                row.append("-")
                continue
            cell = f.cells.get(key, Cell())
            text = fmt(cell.value())
            if cell.configured is not None:
                text += " *"
            row.append(text)
        a, b = f.cells.get("pgbroker"), f.cells.get("redis")
        av, bv = (a.value() if a else None), (b.value() if b else None)
        row.append(fmt(av / bv) if av is not None and bv else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")

    notes = ["", "cells are medians over rounds; '-' = does not apply; n/a = unreachable or failed"]
    for f in figures.values():
        for key, cell in f.cells.items():
            if cell.configured is not None:
                notes.append(f"* {SYSTEM_LABELS[key]}, {f.key}: {cell.note}")
            if cell.error and cell.error != "not reachable":
                notes.append(f"! {SYSTEM_LABELS[key]}, {f.key}: {cell.error}")
            if f.key.startswith("redelivery") and len(cell.values) > 1:
                notes.append(
                    f"  {SYSTEM_LABELS[key]}, {f.key}: per round "
                    + ", ".join(f"{v:.2f}" for v in cell.values)
                    + f" s (max {max(cell.values):.2f})"
                )
    for system in systems:
        if system.error:
            notes.append(f"! {system.label} not reachable: {system.error}")
    if "idle_sessions" in env:
        notes.append(
            "  idle: sessions connected at the end "
            + ", ".join(f"{k}={v}" for k, v in env["idle_sessions"].items())
            + f"; background (database with no client) "
            f"{env['idle_background_queries_per_s']:.3f} queries/s"
        )
    return "\n".join(lines + notes)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["_child"]:
        child_main(args[1])
        return 0
    s = parse_args(args)
    report = run(s)
    print(render(report))
    if s.json_path:
        Path(s.json_path).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
