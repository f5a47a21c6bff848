"""``pgbroker demo``: a durable workflow survives the SIGKILL of its worker.

Sends a chain of three durable tasks (:mod:`pgbroker_demo.app`: seven
checkpointed steps), runs it on a real ``celery worker`` subprocess, kills
that worker and its pool process with SIGKILL in the middle of the chain,
starts a second worker and follows the workflow as it resumes at the next
step and finishes. Prints what ran, what was replayed from a checkpoint, the
time from the kill to the work resuming, and a summary; exits 0 when every
step's body ran exactly once and the workflow finished.

Database: ``--url`` / ``PGBROKER_URL``, else a throwaway embedded PostgreSQL
(``pip install "pgbroker[embedded]"``). Everything lives in its own schema
(``pgbroker_demo``), created afresh and dropped at the end, so an existing
pgbroker schema and its queues are never touched.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pgbroker.database.pools import close_app
from pgbroker.errors import ConfigurationError, PgBrokerError
from pgbroker.options import schema_name
from pgbroker.urls import mask_password

DEFAULT_SCHEMA = "pgbroker_demo"
#: The workflow (run by pgbroker_demo.app): task name -> its steps, in order.
WORKFLOW: dict[str, list[str]] = {
    "reserve_stock": ["check_inventory", "hold_items"],
    "charge_payment": ["authorize", "capture", "send_receipt"],
    "ship_order": ["print_label", "hand_to_carrier"],
}
#: (task, step): the first worker is killed right after this step commits.
KILL_AFTER = ("charge_payment", "authorize")
QUEUE = "pgbroker-demo"
#: Seconds to wait for any one thing (a worker to start, the workflow to end).
TIMEOUT = 60.0
ORDER_ID = "A-1001"

EVENT_TABLE = """
CREATE TABLE {}.demo_event (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task     text NOT NULL,
    task_id  text NOT NULL,
    step     text NOT NULL,
    step_no  integer NOT NULL,
    event    text NOT NULL,  -- start, redelivered, ran, replayed, finish
    worker   text NOT NULL,
    pid      integer NOT NULL,
    at       double precision NOT NULL  -- the worker's time.time()
)
"""


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from pgbroker.cli.options import Env

    parser = commands.add_parser(
        "demo",
        help="watch a durable workflow survive the SIGKILL of its worker",
        description=(
            "Run a chain of three durable tasks (seven checkpointed steps) on a real "
            "celery worker, kill the worker with SIGKILL in the middle, start another "
            "one and watch the workflow resume at the next step and finish. Uses --url "
            "or PGBROKER_URL, else starts an embedded PostgreSQL (pip install "
            '"pgbroker[embedded]"). Works in its own schema, created afresh and dropped '
            "at the end."
        ),
        epilog="exit status: 0 every step ran exactly once and the workflow finished, "
        "1 it did not, 2 error",
    )
    parser.add_argument(
        "--url",
        action=Env,
        env="PGBROKER_URL",
        metavar="URL",
        help="PostgreSQL URL (default: start an embedded PostgreSQL)",
    )
    parser.add_argument(
        "--schema",
        action=Env,
        env="PGBROKER_DEMO_SCHEMA",
        default=DEFAULT_SCHEMA,
        metavar="NAME",
        help=f"the demo's own schema, replaced on each run (default: {DEFAULT_SCHEMA})",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the demo's schema at the end, to look at it"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    name = schema_name("", "--schema", str(args.schema))
    _say("pgbroker demo: a workflow of durable Celery tasks survives the SIGKILL of its worker")
    with (
        _database(args.url) as (url, embedded),
        tempfile.TemporaryDirectory(prefix="pgbroker-demo-") as tmp,
    ):
        _prepare(url, name)
        try:
            ok = Demo(url, name, Path(tmp)).run()
        finally:
            if not embedded:
                _finish(url, name, args.keep)
    return 0 if ok else 1


# --- the database ----------------------------------------------------------------


@contextlib.contextmanager
def _database(url: str | None) -> Iterator[tuple[str, bool]]:
    """The configured URL, or an embedded server living as long as the block."""
    if url:
        _say(f"database: {mask_password(url)} (--url / PGBROKER_URL)")
        yield url, False
        return
    from pgbroker.database import embedded

    _say("no --url or PGBROKER_URL: starting an embedded PostgreSQL...")
    with tempfile.TemporaryDirectory(prefix="pgbroker-demo-db-") as tmp:
        url, server = embedded.start(Path(tmp) / "data")
        try:
            _say(f"database: {mask_password(url)} (embedded PostgreSQL, deleted at the end)")
            yield url, True
        finally:
            server.cleanup()


def _connect(url: str) -> psycopg.Connection:
    from pgbroker.database.sessions import connect

    return connect(url, connect_timeout=10)


def _prepare(url: str, name: str) -> None:
    """A fresh demo schema: migrated, with the demo's event table."""
    from pgbroker.database import schema

    with _connect(url) as conn:
        ident = sql.Identifier(name)
        exists = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", [name]).fetchone()
        if exists:
            ours = conn.execute(
                "SELECT to_regclass(format('%%I.demo_event', %s::text))", [name]
            ).fetchone()
            if ours is None or ours[0] is None:
                raise ConfigurationError(
                    f"schema {name!r} exists and was not made by `pgbroker demo`, which "
                    "replaces its schema on each run: pass --schema with another name"
                )
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(ident))
        schema.migrate(conn, name)
        conn.execute(sql.SQL(EVENT_TABLE).format(ident))
    _say(f'schema: "{name}" (the demo\'s own; created afresh)')


def _finish(url: str, name: str, keep: bool) -> None:
    with contextlib.suppress(psycopg.Error, PgBrokerError), _connect(url) as conn:
        if keep:
            _say(
                f'kept schema "{name}": SELECT * FROM {name}.demo_event ORDER BY id; '
                f"SELECT * FROM {name}.durable_step"
            )
        else:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))
            _say(f'dropped schema "{name}" (--keep keeps it)')


# --- the demo ----------------------------------------------------------------------


@dataclass
class Event:
    id: int
    task: str
    task_id: str
    step: str
    step_no: int
    event: str
    worker: str
    pid: int
    at: float


@dataclass
class Worker:
    number: int
    proc: subprocess.Popen[bytes]
    log: Path
    started: float
    ready: float | None = None
    announced: bool = False

    def is_ready(self) -> bool:
        if self.ready is None and "ready." in self.log.read_text(errors="replace"):
            self.ready = time.time()
        return self.ready is not None

    def kill(self) -> list[int]:
        """SIGKILL the worker and its pool processes (its process group)."""
        pids = _group_pids(self.proc.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return pids

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # warm shutdown
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        self.kill()


@dataclass
class Demo:
    url: str
    schema: str
    tmp: Path
    t0: float = field(default_factory=time.time)
    events: list[Event] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)

    def run(self) -> bool:
        os.environ["PGBROKER_DEMO_URL"] = self.url
        os.environ["PGBROKER_DEMO_SCHEMA"] = self.schema
        tasks = _import_app()
        steps = sum(len(s) for s in WORKFLOW.values())
        names = " -> ".join(WORKFLOW)
        _say(f"workflow: order {ORDER_ID} = {names}")
        _say(
            f"          a chain of {len(WORKFLOW)} DurableTasks with {steps} steps; each "
            "step commits its effect"
        )
        _say("          with its checkpoint, in one transaction: exactly once")
        _say("")
        try:
            return self._run(tasks, steps)
        except BaseException:
            for w in self.workers:
                text = w.log.read_text(errors="replace") if w.log.exists() else ""
                print(f"--- worker {w.number} log (last 6000 characters) ---", file=sys.stderr)
                print(text[-6000:], file=sys.stderr)
            raise
        finally:
            for w in self.workers:
                w.stop()
            close_app(tasks.app)

    def _run(self, tasks: Any, steps: int) -> bool:
        from celery import chain

        pause = self.tmp / "paused"
        first = self._start_worker(1, {"PGBROKER_DEMO_PAUSE_FILE": str(pause)})
        workflow = chain(
            tasks.reserve_stock.s(ORDER_ID), tasks.charge_payment.s(), tasks.ship_order.s()
        )
        result = workflow.delay()
        self._line(f"started worker 1 (celery worker, pid {first.proc.pid})")
        self._line("sent the workflow: it waits in PostgreSQL for a worker")
        self._wait(first.is_ready, first, "worker 1 to start")
        self._line("worker 1 is ready")
        self._wait(pause.exists, first, "worker 1 to reach the middle of the workflow")
        self._follow()
        task, step = KILL_AFTER
        killed = first.kill()
        kill_at = time.time()
        self._line(
            f"SIGKILL worker 1 (pids {', '.join(map(str, killed))}): in the middle of the "
            f"workflow, {task} has committed step '{step}' and not started the next one"
        )
        self._line(f"  {task} is not acknowledged: its message is still in PostgreSQL")

        second = self._start_worker(2, {})
        self._line(f"started worker 2 (pid {second.proc.pid})")
        deadline = time.monotonic() + TIMEOUT
        while not result.ready():
            self._follow()
            second.is_ready()
            if second.ready is not None and not second.announced:
                self._line(f"worker 2 is ready, {second.ready - kill_at:.1f} s after the kill")
                second.announced = True
            if second.proc.poll() is not None:
                raise PgBrokerError(f"worker 2 exited with status {second.proc.returncode}")
            if time.monotonic() > deadline:
                raise PgBrokerError(f"the workflow did not finish within {TIMEOUT:.0f} s")
            time.sleep(0.05)
        value = result.get(timeout=TIMEOUT)
        self._follow()
        second.is_ready()
        self._line(f"workflow finished: shipped order {value['order']}")
        second.stop()
        return self._summary(tasks, steps, kill_at, second)

    # --- the pieces ------------------------------------------------------------------

    def _start_worker(self, number: int, extra: dict[str, str]) -> Worker:
        log = self.tmp / f"worker{number}.log"
        command = [
            sys.executable, "-m", "celery", "-A", "pgbroker_demo.app", "worker",
            "--pool=prefork", "--concurrency=1", "--loglevel=info",
            "-n", f"demo{number}@%h",
        ]  # fmt: skip
        env = {
            **os.environ,
            "PGBROKER_DEMO_URL": self.url,
            "PGBROKER_DEMO_SCHEMA": self.schema,
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                command,
                cwd=self.tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed as one
            )
        worker = Worker(number, proc, log, time.time())
        self.workers.append(worker)
        return worker

    def _wait(self, ready: Any, worker: Worker, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not ready():
            self._follow()
            if worker.proc.poll() is not None:
                raise PgBrokerError(
                    f"worker {worker.number} exited with status {worker.proc.returncode} "
                    f"while waiting for {what}"
                )
            if time.monotonic() > deadline:
                raise PgBrokerError(f"timed out after {TIMEOUT:.0f} s waiting for {what}")
            time.sleep(0.05)

    def _follow(self) -> None:
        """Print the events recorded since the last call."""
        last = self.events[-1].id if self.events else 0
        with _connect(self.url) as conn:
            rows = conn.execute(
                sql.SQL(
                    "SELECT id, task, task_id, step, step_no, event, worker, pid, at "
                    "FROM {}.demo_event WHERE id > %s ORDER BY id"
                ).format(sql.Identifier(self.schema)),
                [last],
            ).fetchall()
        for row in rows:
            e = Event(*row)
            self.events.append(e)
            who = _who(e.worker)
            if e.event == "start":
                what = "started"
            elif e.event == "redelivered":
                what = "delivered again (its worker died before acking it): resuming"
            elif e.event == "finish":
                what = "finished"
            elif e.event == "ran":
                what = f"step {e.step_no} {e.step:<16} ran"
            else:
                what = f"step {e.step_no} {e.step:<16} skipped: replayed from its checkpoint"
            self._line(f"{who:<9} {e.task:<15} {what}", at=e.at)

    def _line(self, text: str, at: float | None = None) -> None:
        _say(f"[{(at or time.time()) - self.t0:5.1f}s] {text}")

    def _summary(self, tasks: Any, steps: int, kill_at: float, second: Worker) -> bool:
        _say("")
        _say("summary")
        ran: dict[tuple[str, str], list[str]] = {}
        replayed: dict[tuple[str, str], list[str]] = {}
        for e in self.events:
            if e.event == "ran":
                ran.setdefault((e.task, e.step), []).append(_who(e.worker))
            elif e.event == "replayed":
                replayed.setdefault((e.task, e.step), []).append(_who(e.worker))
        rows = [["TASK", "STEP", "BODY RAN", "REPLAYED FROM CHECKPOINT"]]
        once = True
        for task, names in WORKFLOW.items():
            for name in names:
                r = ran.get((task, name), [])
                p = replayed.get((task, name), [])
                once = once and len(r) == 1
                rows.append(
                    [
                        task,
                        name,
                        f"{len(r)}x" + (f" ({', '.join(r)})" if r else ""),
                        f"{len(p)}x" + (f" ({', '.join(p)})" if p else ""),
                    ]
                )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            _say("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        after = [e for e in self.events if e.at > kill_at and e.event in ("ran", "replayed")]
        n_replayed = sum(len(p) for p in replayed.values())
        _say("")
        if once:
            _say(f"  every step's body ran exactly once ({steps} steps)")
        else:
            _say("  SOME STEP'S BODY DID NOT RUN EXACTLY ONCE")
        _say(f"  replayed from checkpoints after the kill: {n_replayed} step(s), body not run")
        finished_before = [
            t
            for t in WORKFLOW
            if any(e.task == t and e.event == "finish" and e.at < kill_at for e in self.events)
        ]
        if finished_before:
            _say(f"  not run again: {', '.join(finished_before)} (finished before the kill)")
        if after:
            resumed = after[0].at - kill_at
            ready = (second.ready or after[0].at) - kill_at
            _say(
                f"  time from the kill to the work resuming: {resumed:.1f} s "
                f"(worker 2 started and ready: {ready:.1f} s; its task delivered again and "
                f"resumed {resumed - ready:.1f} s later)"
            )
        _say(f"  total: {time.time() - self.t0:.1f} s")
        _say("  ok" if once else "  FAILED")
        return once


def _import_app() -> Any:
    import importlib

    sys.modules.pop("pgbroker_demo.app", None)  # read the URL set above
    return importlib.import_module("pgbroker_demo.app")


def _group_pids(pgid: int) -> list[int]:
    """Live processes in a process group (a worker and its pool processes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return sorted(pids) or [pgid]


def _who(node: str) -> str:
    return node.replace("demo", "worker ")


def _say(text: str) -> None:
    print(text, flush=True)
