"""pgbroker durable steps: a task resumes after its worker is SIGKILLed.

    python examples/durable/run.py

Uses the database in ``PGBROKER_URL`` if set, else starts a throwaway
embedded PostgreSQL. Sends ``onboard(42)`` (three steps: create_account,
charge, welcome_email), starts a worker, kills it with SIGKILL right after
the charge step committed, starts a second worker, and shows that the task
finished there with every step's body run exactly once. Everything lives in
the example's own schema (``PGBROKER_EXAMPLE_SCHEMA``, default
``pgbroker_durable_example``), created afresh and dropped at the end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql

from pgbroker.database import embedded
from pgbroker.durable import recorded_steps
from pgbroker.urls import mask_password

HERE = Path(__file__).resolve().parent
TIMEOUT = 60  # seconds to wait for anything
USER_ID = 42
SCHEMA = os.environ.get("PGBROKER_EXAMPLE_SCHEMA", "pgbroker_durable_example")
#: The comment that marks a schema as the example's, safe to replace.
MARK = "pgbroker example: durable"


@contextlib.contextmanager
def database() -> Iterator[str]:
    """PGBROKER_URL, or an embedded server that lives as long as the block."""
    url = os.environ.get("PGBROKER_URL")
    if url:
        print(f"database: {mask_password(url)} (from PGBROKER_URL)")
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="pgbroker-durable-") as tmp:
        print("starting an embedded PostgreSQL (set PGBROKER_URL to use your own)...")
        url, server = embedded.start(Path(tmp) / "data")
        try:
            print(f"database: {mask_password(url)} (embedded PostgreSQL)")
            yield url
        finally:
            server.cleanup()  # stop the server and delete its data


@contextlib.contextmanager
def own_schema(url: str) -> Iterator[None]:
    """The example's schema, created afresh with its log table (pgbroker
    creates its own tables in it on first use) and dropped at the end; a
    schema of that name that the example did not create is left alone."""
    name = sql.Identifier(SCHEMA)
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = %s",
            [SCHEMA],
        ).fetchone()
        if row is not None and row[0] != MARK:
            raise SystemExit(
                f"schema {SCHEMA!r} exists and is not the example's: "
                "set PGBROKER_EXAMPLE_SCHEMA to another name"
            )
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(name))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(name))
        conn.execute(sql.SQL("COMMENT ON SCHEMA {} IS {}").format(name, sql.Literal(MARK)))
        conn.execute(
            sql.SQL("CREATE TABLE {} (user_id int, step text, pid int)").format(
                sql.Identifier(SCHEMA, "durable_demo_log")
            )
        )
    print(f'schema: "{SCHEMA}" (the example\'s own)')
    try:
        yield
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(name))
        print(f'dropped schema "{SCHEMA}"')


def start_worker(n: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``celery -A tasks worker`` with one pool process, in its own process group."""
    command = [
        sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool=prefork",
        "--concurrency=1", "--loglevel=info", "-n", f"durable{n}@{socket.gethostname()}",
    ]  # fmt: skip
    with open(log, "ab") as out:
        return subprocess.Popen(
            command,
            cwd=HERE,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for(path: Path, worker: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the task did not reach its crash point")
        time.sleep(0.05)


def kill(worker: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker and its pool processes: a machine dying."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()


def ran(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            sql.SQL("SELECT step, count(*) FROM {} WHERE user_id = %s GROUP BY step").format(
                sql.Identifier(SCHEMA, "durable_demo_log")
            ),
            [USER_ID],
        ).fetchall()
    return {step: count for step, count in rows}


def demo(url: str, tmp: Path) -> bool:
    # tasks.py reads its database URL from the environment when imported.
    os.environ["PGBROKER_URL"] = url
    sys.path.insert(0, str(HERE))
    import tasks

    pause = tmp / "charge-committed"
    env = {**os.environ, "PGBROKER_URL": url, "DEMO_PAUSE_FILE": str(pause)}
    log = tmp / "worker.log"

    result = tasks.onboard.delay(USER_ID)
    print(f"sent onboard({USER_ID}) (task {result.id})")
    first = start_worker(1, env, log)
    try:
        wait_for(pause, first)
        print(f"worker 1: task in pool process {pause.read_text()} committed step 2 (charge)")
        kill(first)
        print("killed worker 1 with SIGKILL")
    finally:
        kill(first)
    steps = recorded_steps(url, result.id, schema=SCHEMA)
    done = [f"{s.step_index}:{s.name}" for s in steps]
    print(f"recorded before the crash: {', '.join(done)}")

    second = start_worker(2, env, log)
    print("started worker 2: it finds the unacknowledged task and runs it again")
    try:
        print(f"onboard({USER_ID}) = {result.get(timeout=TIMEOUT)}")
        second.send_signal(signal.SIGTERM)  # warm shutdown
        second.wait(timeout=TIMEOUT)
    finally:
        kill(second)
        # Close this process's broker connections before the schema goes.
        tasks.app.pool.force_close_all()
        tasks.app.close()

    counts = ran(url)
    for step in ("create_account", "charge", "welcome_email"):
        print(f"{step} ran {counts.get(step, 0)} time(s)")
    once = all(counts.get(s) == 1 for s in ("create_account", "charge", "welcome_email"))
    print("every step ran exactly once" if once else "SOME STEP DID NOT RUN EXACTLY ONCE")
    return once


def main() -> int:
    with (
        database() as url,
        own_schema(url),
        tempfile.TemporaryDirectory(prefix="pgbroker-durable-run-") as tmp,
    ):
        try:
            ok = demo(url, Path(tmp))
        except Exception:
            log = Path(tmp) / "worker.log"
            if log.exists():
                print(f"--- worker log ---\n{log.read_text(errors='replace')}", file=sys.stderr)
            raise
    print("done")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
