"""Running the scenarios against one system after another, and the report.

A *system* is a broker URL with a result backend URL. For each one the runner
builds the suite's app in a fresh namespace, declares its queues, starts one
``celery worker`` (prefork, concurrency 2, the same command for every
system), runs the scenarios in order and stops the worker.

Outcomes: ``pass``; ``fail`` (the system misbehaved: a check failed, a task
failed or timed out, the broker raised); ``skip`` (does not apply);
``not run`` (the system's client library is not installed, or its broker or
backend does not answer: no verdict on it); and ``error``, an unexpected
exception of a built-in type (TypeError, KeyError...) raised by the harness
itself, which is a bug to fix here, never a verdict on the system.
"""

from __future__ import annotations

import contextlib
import importlib
import shutil
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from kombu import Connection
from kombu.utils.url import maybe_sanitize_url

from compat.apps.suite_app import Names, make_app
from compat.suite.context import Context
from compat.suite.scenarios import SCENARIOS, Behaviours, Skip
from compat.suite.worker import WORKER_ARGS, WorkerProcess, nodename_for
from pgbroker.database.pools import close_app

PASS, FAIL, SKIP, ERROR, NOT_RUN = "pass", "fail", "skip", "error", "not run"

_SYSTEM_NAMES = {
    "postgresql": "pgbroker",
    "postgres": "pgbroker",
    "pgbroker": "pgbroker",
    "redis": "redis",
    "rediss": "redis",
    "amqp": "rabbitmq",
    "amqps": "rabbitmq",
    "pyamqp": "rabbitmq",
}


#: The client library a URL scheme needs, and how to install it.
_CLIENTS = {
    "redis": ("redis", "pip install redis"),
    "rediss": ("redis", "pip install redis"),
    "amqp": ("amqp", "pip install amqp"),
    "amqps": ("amqp", "pip install amqp"),
    "pyamqp": ("amqp", "pip install amqp"),
    "postgresql": ("psycopg", "pip install pgbroker"),
    "postgres": ("psycopg", "pip install pgbroker"),
    "pgbroker": ("psycopg", "pip install pgbroker"),
}


def system_name(broker_url: str) -> str:
    scheme = urlsplit(broker_url).scheme.lower()
    return _SYSTEM_NAMES.get(scheme, scheme or "system")


def default_backend(broker_url: str) -> str:
    """The broker URL itself, except for AMQP, whose results go over rpc://."""
    scheme = urlsplit(broker_url).scheme.lower()
    return "rpc://" if system_name(broker_url) == "rabbitmq" or not scheme else broker_url


@dataclass(frozen=True)
class System:
    name: str
    broker: str
    backend: str

    def masked(self) -> dict[str, str]:
        return {
            "name": self.name,
            "broker": maybe_sanitize_url(self.broker),
            "backend": maybe_sanitize_url(self.backend),
        }


@dataclass
class Outcome:
    status: str
    detail: str = ""
    seconds: float = 0.0


@dataclass
class SystemRun:
    system: System
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    seconds: float = 0.0
    log: str = ""


@dataclass
class Report:
    scenarios: list[str]
    target: SystemRun
    references: list[SystemRun]
    worker_command: str

    @property
    def runs(self) -> list[SystemRun]:
        return [self.target, *self.references]

    def target_ok(self) -> bool:
        return all(o.status in (PASS, SKIP) for o in self.target.outcomes.values())

    def harness_errors(self) -> list[str]:
        return [
            f"{run.system.name} {name}: {o.detail}"
            for run in self.runs
            for name, o in run.outcomes.items()
            if o.status == ERROR
        ]

    def table(self) -> str:
        return render_table(self)

    def to_json(self) -> dict[str, Any]:
        return {
            "worker_command": self.worker_command,
            "scenarios": self.scenarios,
            "systems": [
                {
                    **run.system.masked(),
                    "role": "target" if run is self.target else "reference",
                    "seconds": round(run.seconds, 2),
                    "outcomes": {
                        name: {**asdict(o), "seconds": round(o.seconds, 2)}
                        for name, o in run.outcomes.items()
                    },
                }
                for run in self.runs
            ],
        }


def why_not_run(system: System) -> str:
    """Why the system cannot be run at all ("" when it can): a client library
    that is not installed, or a broker or backend that does not answer."""
    urls = [u for u in dict.fromkeys([system.broker, system.backend]) if _scheme(u) in _CLIENTS]
    for url in urls:
        module, install = _CLIENTS[_scheme(url)]
        try:
            importlib.import_module(module)
        except ImportError:
            return f"the {module} client is not installed: {install}"
    for url in urls:
        try:
            with Connection(url, connect_timeout=5) as conn:
                conn.ensure_connection(max_retries=1, interval_start=0.5, timeout=10)
        except Exception as exc:
            return f"not reachable at {maybe_sanitize_url(url)}: {one_line(exc)}"
    return ""


def _scheme(url: str) -> str:
    return urlsplit(url).scheme.lower()


def classify(exc: BaseException) -> str:
    """FAIL for what the system did, ERROR for a bug in the harness."""
    if isinstance(exc, (AssertionError, OSError, TimeoutError)):
        return FAIL
    # Celery, Kombu, psycopg, redis-py... errors come from the system.
    return ERROR if type(exc).__module__ == "builtins" else FAIL


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    if not isinstance(exc, AssertionError):
        message = f"{type(exc).__name__}: {message}"
    return message[:300]


def run_system(
    system: System,
    scenarios: Sequence[str],
    log_dir: Path,
    progress: Callable[[str], None] = lambda line: None,
) -> SystemRun:
    run = SystemRun(system)
    started = time.monotonic()
    reason = why_not_run(system)
    if reason:
        progress(f"[{system.name}] not run: {reason}")
        run.outcomes = {name: Outcome(NOT_RUN, reason) for name in scenarios}
        return run
    namespace = f"compat-{uuid.uuid4().hex[:8]}"
    names = Names(namespace)
    app = make_app(system.broker, system.backend, namespace)
    state_dir = Path(tempfile.mkdtemp(prefix=f"compat-{system.name}-"))
    nodename = nodename_for(system.name, namespace)
    env = {
        "COMPAT_BROKER": system.broker,
        "COMPAT_BACKEND": system.backend,
        "COMPAT_NAMESPACE": namespace,
    }
    log_path = log_dir / f"{system.name}-worker.log"
    run.log = str(log_path)
    worker = WorkerProcess(nodename, names.worker_queues(), env, log_path)
    try:
        try:
            with app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=2, interval_start=0.5, timeout=10)
                channel = conn.default_channel
                for queue in app.amqp.queues.values():
                    queue(channel).declare()
            worker.start()
            worker.wait_ready(app, timeout=60)
        except Exception as exc:
            reason = f"setup: {one_line(exc)}"
            progress(f"[{system.name}] {reason}")
            for name in scenarios:
                run.outcomes[name] = Outcome(FAIL, reason)
            return run
        ctx = Context(
            app=app,
            names=names,
            nodename=nodename,
            state_dir=state_dir,
            driver_type=app.connection_for_write().transport.driver_type,
            backend_name=urlsplit(system.backend).scheme.split("+")[0].lower(),
        )
        behaviours = Behaviours(ctx)
        for name in scenarios:
            if not worker.alive():
                progress(f"[{system.name}] worker gone, starting a new one")
                worker.stop()
                worker = WorkerProcess(nodename, names.worker_queues(), env, log_path)
                worker.start()
                try:
                    worker.wait_ready(app, timeout=60)
                except RuntimeError as exc:
                    run.outcomes[name] = Outcome(FAIL, f"worker restart: {one_line(exc)}")
                    continue
            outcome = _run_one(behaviours, name)
            if not worker.alive():
                outcome = Outcome(
                    FAIL,
                    f"the worker exited (code {worker.returncode()}) during the scenario; "
                    + outcome.detail,
                    outcome.seconds,
                )
            run.outcomes[name] = outcome
            shown = f"{outcome.status} {outcome.seconds:.1f}s"
            progress(f"[{system.name}] {name}: {shown}  {outcome.detail}".rstrip())
            if outcome.status in (FAIL, ERROR):
                # Leftover tasks (blockers...) must not spill into the next one.
                ctx.settle()
        return run
    finally:
        worker.stop()
        _delete_queues(app)
        _close(app)
        shutil.rmtree(state_dir, ignore_errors=True)
        run.seconds = time.monotonic() - started


def _run_one(behaviours: Behaviours, name: str) -> Outcome:
    started = time.monotonic()
    behaviours.c.step("")
    try:
        note = SCENARIOS[name](behaviours)
        status, detail = PASS, note or ""
    except Skip as exc:
        status, detail = SKIP, str(exc)
    except Exception as exc:
        status, detail = classify(exc), one_line(exc)
        step = behaviours.c.current_step
        if step and not isinstance(exc, AssertionError):
            detail = f"{step}: {detail}"
        if status == ERROR:
            detail = f"harness error: {detail}\n{traceback.format_exc()}"
    return Outcome(status, detail, time.monotonic() - started)


def _delete_queues(app: Celery) -> None:
    # The run's queues and exchanges only (its namespace); never a purge.
    with contextlib.suppress(Exception), app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
        channel = conn.default_channel
        for queue in app.amqp.queues.values():
            with contextlib.suppress(Exception):
                bound = queue(channel)
                # Declared again first: virtual transports (Redis) delete
                # only the bindings this connection knows of.
                bound.declare()
                bound.delete()
            # Each queue has its own exchange, named after it (Redis keeps
            # an exchange's bindings in a key that would outlive the run).
            if queue.exchange is not None and queue.exchange.name == queue.name:
                with contextlib.suppress(Exception):
                    queue.exchange(channel).delete()


def _close(app: Celery) -> None:
    # No session outlives the run (a test drops its database right after).
    with contextlib.suppress(Exception):
        # Celery's Redis backend unsubscribes a result when it is finalised,
        # which would open a new pub/sub connection: forget the subscriptions.
        getattr(app.backend.result_consumer, "subscribed_to", set()).clear()
    with contextlib.suppress(Exception):
        # Celery 5.5's Redis backend unsubscribes on its pub/sub even once
        # closed, which reconnects it (a socket left open; 5.7 defers it):
        # closed and dropped here.
        consumer = app.backend.result_consumer
        if getattr(consumer, "_pubsub", None) is not None:
            consumer._pubsub.close()
            consumer._pubsub = None
    with contextlib.suppress(Exception):
        # The Redis result backend's own connections (its client's pool).
        app.backend.client.connection_pool.disconnect()
    close_app(app)


def run_suite(
    target: System,
    references: Sequence[System] = (),
    only: Sequence[str] | None = None,
    reference_only: Sequence[str] | None = None,
    log_dir: Path | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> Report:
    """Run the scenarios against the target, then each reference."""
    scenarios = list(only) if only else list(SCENARIOS)
    unknown = [name for name in [*scenarios, *(reference_only or [])] if name not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    keep = log_dir is not None
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="compat-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    target_run = run_system(target, scenarios, log_dir, progress)
    ref_scenarios = [n for n in scenarios if reference_only is None or n in reference_only]
    reference_runs = [run_system(ref, ref_scenarios, log_dir, progress) for ref in references]
    report = Report(
        scenarios=scenarios,
        target=target_run,
        references=reference_runs,
        worker_command=" ".join(
            ["celery -A compat.apps.worker", *WORKER_ARGS, "-n NODE -Q QUEUES"]
        ),
    )
    clean = report.target_ok() and not report.harness_errors()
    if not keep and clean:
        shutil.rmtree(log_dir, ignore_errors=True)
        for run in report.runs:
            run.log = ""
    return report


def render_table(report: Report) -> str:
    """scenario | target | references..., with footnotes for reasons and notes."""
    runs = report.runs
    headers = ["scenario", *(run.system.name for run in runs)]
    rows: list[list[str]] = []
    notes: list[str] = []
    notes_by_text: dict[str, int] = {}
    for name in report.scenarios:
        row = [name]
        for run in runs:
            outcome = run.outcomes.get(name)
            if outcome is None:
                row.append("-")
                continue
            cell = outcome.status.upper() if outcome.status in (FAIL, ERROR) else outcome.status
            if outcome.status == NOT_RUN:
                # One footnote for the whole column: the reason is the same.
                note = f"{run.system.name}: not run ({outcome.detail})"
                if note not in notes_by_text:
                    notes.append(f"[{len(notes) + 1}] {note}")
                    notes_by_text[note] = len(notes)
                row.append(f"{cell} [{notes_by_text[note]}]")
                continue
            if outcome.detail:
                notes.append(
                    f"[{len(notes) + 1}] {run.system.name} {name}: "
                    + outcome.detail.splitlines()[0]
                )
                cell += f" [{len(notes)}]"
            row.append(cell)
        rows.append(row)
    rows.append(["(seconds)", *(f"{run.seconds:.0f}" for run in runs)])
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    out.append("")
    out += notes
    return "\n".join(out)
