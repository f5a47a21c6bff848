"""What the three transactional demos share: a database, a worker, checks."""

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
from pgbroker.urls import mask_password

HERE = Path(__file__).resolve().parent
TIMEOUT = 60  # seconds to wait for anything
#: The comment that marks a schema as the example's, safe to replace.
MARK = "pgbroker example: transactional"


@contextlib.contextmanager
def database() -> Iterator[str]:
    """PGBROKER_URL, or an embedded server that lives as long as the block."""
    url = os.environ.get("PGBROKER_URL")
    if url:
        print(f"database: {mask_password(url)} (from PGBROKER_URL)")
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="pgbroker-tx-") as tmp:
        print("starting an embedded PostgreSQL (set PGBROKER_URL to use your own)...")
        url, server = embedded.start(Path(tmp) / "data")
        try:
            print(f"database: {mask_password(url)} (embedded PostgreSQL)")
            yield url
        finally:
            server.cleanup()


@contextlib.contextmanager
def own_schema(url: str, schema: str) -> Iterator[None]:
    """The example's schema, created afresh (pgbroker creates its tables in it
    on first use) and dropped at the end; a schema of that name that the
    example did not create is left alone."""
    name = sql.Identifier(schema)
    with psycopg.connect("postgresql://" + url.partition("://")[2], autocommit=True) as conn:
        row = conn.execute(
            "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = %s",
            [schema],
        ).fetchone()
        if row is not None and row[0] != MARK:
            raise SystemExit(
                f"schema {schema!r} exists and is not the example's: "
                "set PGBROKER_EXAMPLE_SCHEMA to another name"
            )
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(name))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(name))
        conn.execute(sql.SQL("COMMENT ON SCHEMA {} IS {}").format(name, sql.Literal(MARK)))
    print(f'schema: "{schema}" (the example\'s own)')
    try:
        yield
    finally:
        with psycopg.connect("postgresql://" + url.partition("://")[2], autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(name))
        print(f'dropped schema "{schema}"')


@contextlib.contextmanager
def example(url: str):  # type: ignore[no-untyped-def]
    """The example's schema with its tables, and its tasks module; at the
    end, this process's broker connections closed and the schema dropped."""
    # tasks.py reads its database URL from the environment when imported.
    os.environ["PGBROKER_URL"] = url
    sys.path.insert(0, str(HERE))
    import tasks

    with own_schema(url, tasks.SCHEMA):
        tasks.create_tables()
        try:
            yield tasks
        finally:
            tasks.app.pool.force_close_all()
            tasks.app.close()


@contextlib.contextmanager
def worker(url: str) -> Iterator[None]:
    """``celery -A tasks worker`` in its own process group, stopped on exit."""
    log = Path(tempfile.mkstemp(prefix="pgbroker-tx-worker-", suffix=".log")[1])
    command = [
        sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool=solo",
        "--loglevel=info", "-n", f"transactional@{socket.gethostname()}",
    ]  # fmt: skip
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            command,
            cwd=HERE,
            env={**os.environ, "PGBROKER_URL": url},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + TIMEOUT
        while " ready." not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start:\n{log.read_text()}")
            time.sleep(0.1)
        print("worker ready")
        yield
        proc.send_signal(signal.SIGTERM)  # warm shutdown
        proc.wait(TIMEOUT)
    except BaseException:
        print(f"--- worker log ---\n{log.read_text(errors='replace')}", file=sys.stderr)
        raise
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.unlink()


def messages_for(tasks, task_id: str) -> int:  # type: ignore[no-untyped-def]
    """Messages of this task a worker could claim now (another session's view)."""
    with tasks.connect() as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE task_id = %s").format(
                sql.Identifier(tasks.SCHEMA, "message")
            ),
            [task_id],
        ).fetchone()
    return int(row[0]) if row else 0


def emails_sent(tasks) -> list[int]:  # type: ignore[no-untyped-def]
    with tasks.connect() as conn:
        rows = conn.execute("SELECT order_id FROM shop_email ORDER BY order_id").fetchall()
    return [r[0] for r in rows]
