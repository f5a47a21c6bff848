"""pgbroker quickstart: a Celery worker processing tasks through PostgreSQL.

    python examples/quickstart/run.py

Uses the database in ``PGBROKER_URL`` if set (``postgresql://user:password@
host:port/dbname``), else starts a throwaway embedded PostgreSQL. Then it
sends a task, starts a worker (``celery -A tasks worker``) to run it, sends a
chain and a group, pings the worker and shuts it down. Everything lives in
the example's own schema (``PGBROKER_EXAMPLE_SCHEMA``, default
``pgbroker_quickstart``), created afresh and dropped at the end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
from celery import chain, group
from psycopg import sql

from pgbroker.database import embedded
from pgbroker.urls import mask_password

HERE = Path(__file__).resolve().parent
NODE = f"quickstart@{socket.gethostname()}"
SCHEMA = os.environ.get("PGBROKER_EXAMPLE_SCHEMA", "pgbroker_quickstart")
#: The comment that marks a schema as the example's, safe to replace.
MARK = "pgbroker example: quickstart"
TIMEOUT = 60  # seconds to wait for any one result


@contextlib.contextmanager
def database() -> Iterator[str]:
    """PGBROKER_URL, or an embedded server that lives as long as the block."""
    url = os.environ.get("PGBROKER_URL")
    if url:
        print(f"broker: {mask_password(url)} (from PGBROKER_URL)")
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="pgbroker-quickstart-") as tmp:
        print("starting an embedded PostgreSQL (set PGBROKER_URL to use your own)...")
        url, server = embedded.start(Path(tmp) / "data")
        try:
            print(f"broker: {mask_password(url)} (embedded PostgreSQL)")
            yield url
        finally:
            server.cleanup()  # stop the server and delete its data


@contextlib.contextmanager
def own_schema(url: str) -> Iterator[None]:
    """The example's schema, created afresh (pgbroker creates its tables in it
    on first use) and dropped at the end; a schema of that name that the
    example did not create is left alone."""
    name = sql.Identifier(SCHEMA)
    with psycopg.connect("postgresql://" + url.partition("://")[2], autocommit=True) as conn:
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
    print(f'schema: "{SCHEMA}" (the example\'s own)')
    try:
        yield
    finally:
        with psycopg.connect("postgresql://" + url.partition("://")[2], autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(name))
        print(f'dropped schema "{SCHEMA}"')


def start_worker(url: str, log: Path) -> subprocess.Popen[bytes]:
    """``celery -A tasks worker``, with two prefork processes, in the background."""
    command = [
        sys.executable, "-m", "celery", "-A", "tasks", "worker",
        "--pool=prefork", "--concurrency=2", "--loglevel=info", "-n", NODE,
    ]  # fmt: skip
    with open(log, "wb") as out:
        return subprocess.Popen(
            command,
            cwd=HERE,
            env={**os.environ, "PGBROKER_URL": url},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C here is handled below, not by the worker
        )


def demo(url: str, log: Path) -> None:
    # tasks.py reads its broker URL from the environment when imported.
    os.environ["PGBROKER_URL"] = url
    sys.path.insert(0, str(HERE))
    import tasks

    first = tasks.add.delay(2, 3)
    print("sent add(2, 3) before any worker runs: it waits in PostgreSQL")

    worker = start_worker(url, log)
    print(f"started worker {NODE} (celery -A tasks worker, pid {worker.pid})")
    try:
        print(f"add(2, 3) = {first.get(timeout=TIMEOUT)}")

        pipeline = chain(tasks.add.s(2, 2), tasks.mul.s(10), tasks.add.s(1))
        print(f"chain add(2, 2) | mul(10) | add(1) = {pipeline.delay().get(timeout=TIMEOUT)}")

        squares = group(tasks.square.s(i) for i in range(10))
        print(f"group square(0..9) = {squares.delay().get(timeout=TIMEOUT)}")

        replies = tasks.app.control.ping(destination=[NODE], timeout=10)
        print(f"ping: {replies}")

        tasks.app.control.shutdown(destination=[NODE])
        code = worker.wait(timeout=TIMEOUT)
        print(f"worker stopped (exit code {code})")
    finally:
        if worker.poll() is None:  # something failed above: do not leave it running
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        # Close this process's broker connections before the schema goes.
        tasks.app.pool.force_close_all()
        tasks.app.close()


def main() -> int:
    with (
        database() as url,
        own_schema(url),
        tempfile.TemporaryDirectory(prefix="pgbroker-worker-") as tmp,
    ):
        log = Path(tmp) / "worker.log"
        try:
            demo(url, log)
        except Exception:
            if log.exists():
                print(f"--- worker log ---\n{log.read_text(errors='replace')}", file=sys.stderr)
            raise
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
