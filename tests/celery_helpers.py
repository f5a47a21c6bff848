"""Starting, watching and stopping real ``celery`` subprocesses in tests.

Every process starts in its own session (process group), so a test can kill
the worker together with its prefork children, and ``Celery.stop()`` in a
``finally`` never leaves a process behind. Output goes to a file rather than
a pipe: a chatty worker can never block on a full pipe, and the test reads
the log whenever it likes.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg

from pgbroker.database.pools import close_app
from pgbroker.results.consumer import channel_for

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def celery_env(broker_url: str, **extra: str) -> dict[str, str]:
    """Environment for a celery subprocess using ``broker_url``.

    The test apps read ``TEST_BROKER_URL``; nothing else tells them about
    pgbroker.
    """
    env = dict(os.environ)
    env["TEST_BROKER_URL"] = broker_url
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    # The worker refuses nothing as root, but warns at length; keep logs short.
    env["C_FORCE_ROOT"] = "1"
    env.update(extra)
    return env


def with_password(url: str, password: str = "Pgb-s3cret-4821") -> tuple[str, str]:
    """``url`` with a password in it, and that password.

    The local test server trusts local users, so any password logs in; a
    server configured with PGBROKER_TEST_DSN already has one in its URL.
    """
    parts = urlsplit(url)
    if parts.password:
        return url, parts.password
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username or 'postgres'}:{password}@{host}"
    return urlunsplit(parts._replace(netloc=netloc)), password


def celery_cmd(app: str, *args: str) -> list[str]:
    """``celery -A app ...`` with the interpreter running the tests."""
    return [sys.executable, "-m", "celery", "-A", app, *args]


def wait_until(
    predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def get_waits(backend: Any, *task_ids: str) -> bool:
    """True once a ``get()`` on each of ``task_ids`` waits for its NOTIFY.

    ``backend`` is the one the results use (``AsyncResult.backend``): an
    app's ``backend`` is one per thread unless ``result_backend_thread_safe``.

    Each wait has started (it took its task's initial read), the LISTENs on
    the tasks' channels were sent and every reply is in, the read after them
    too: from then on only a NOTIFY (or a reconnect) brings anything.
    """
    consumer = backend.result_consumer
    channels = {channel_for(backend.schema, task_id) for task_id in task_ids}
    with consumer._lock:
        return (
            consumer._connection is not None
            and channels <= consumer._listening
            and not any(task_id in consumer._initial for task_id in task_ids)
            and not consumer._to_listen
            and consumer._synced == consumer._sent
        )


class Celery:
    """One ``celery`` subprocess (worker, beat, events...) logging to a file."""

    def __init__(self, name: str, app: str, args: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            celery_cmd(app, *args),
            env=env,
            cwd=log_dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30.0) -> str:
        def seen() -> bool:
            if text in self.log():
                return True
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode} before logging "
                    f"{text!r}:\n{self.log()}"
                )
            return False

        try:
            wait_until(seen, timeout, f"{self.name} to log {text!r}", interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- {self.name} log ---\n{self.log()}") from None
        return self.log()

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout:.0f} s:\n{self.log()}"
            ) from None

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def group_pids(self) -> list[int]:
        """Live processes in this process group (the worker and its children)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # Fields after the command name: state ppid pgrp ...
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == self.proc.pid:
                pids.append(int(entry.name))
        return sorted(pids)

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def stop(self, timeout: float = 15.0) -> None:
        """Warm shutdown (SIGTERM); SIGKILL the whole group if it lingers."""
        try:
            if self.proc.poll() is None:
                self.signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout)
        finally:
            self.kill_group()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            self._log.close()


@contextlib.contextmanager
def started(
    name: str, app: str, args: list[str], env: dict[str, str], log_dir: Path
) -> Iterator[Celery]:
    """A celery subprocess that is stopped (and its group killed) on exit."""
    proc = Celery(name, app, args, env, log_dir)
    try:
        yield proc
    except BaseException:
        # Shown by pytest with the failure: what the process was doing.
        print(f"--- {name} (pid {proc.pid}) log, last 8000 characters ---\n{proc.log()[-8000:]}")
        raise
    finally:
        proc.stop()


def start_worker(
    app: str,
    env: dict[str, str],
    log_dir: Path,
    name: str = "worker",
    extra: tuple[str, ...] = (),
) -> contextlib.AbstractContextManager[Celery]:
    """A prefork worker with two processes, logging at INFO."""
    args = [
        "worker",
        "--pool=prefork",
        "--concurrency=2",
        "-l",
        "info",
        "-n",
        f"{name}@%h",
        *extra,
    ]
    return started(name, app, args, env, log_dir)


def run_celery(
    app: str, args: list[str], env: dict[str, str], timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run a short celery command (inspect, control...) to completion."""
    return subprocess.run(
        celery_cmd(app, *args),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def execute(db_url: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on the test database; return its rows."""
    with psycopg.connect("postgresql://" + db_url.partition("://")[2], autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


@contextlib.contextmanager
def client_app(module: str, broker_url: str) -> Iterator[ModuleType]:
    """Import a test app in this process, bound to ``broker_url``.

    The apps read their URL from the environment at import, so the module is
    imported afresh for each test and its connections closed afterwards.
    """
    saved = os.environ.get("TEST_BROKER_URL")
    os.environ["TEST_BROKER_URL"] = broker_url
    try:
        sys.modules.pop(module, None)
        mod = importlib.import_module(module)
    finally:
        if saved is None:
            del os.environ["TEST_BROKER_URL"]
        else:
            os.environ["TEST_BROKER_URL"] = saved
    try:
        yield mod
    finally:
        close_app(mod.app)
        sys.modules.pop(module, None)


# --- what an example leaves in the user's database ---------------------------


#: Tables a user's application may well have, with the names the examples use.
USER_TABLES = """
CREATE TABLE public.shop_order (id int PRIMARY KEY, note text);
INSERT INTO public.shop_order VALUES (1, 'the user''s own order');
CREATE TABLE public.shop_email (id int, note text);
INSERT INTO public.shop_email VALUES (1, 'the user''s own mail');
CREATE TABLE public.durable_demo_log (id int, note text);
INSERT INTO public.durable_demo_log VALUES (1, 'the user''s own log');
"""


def add_user_data(url: str) -> None:
    """The user's own tables in ``public`` (named as the examples' tables),
    and a message waiting in the ``celery`` queue of the ``pgbroker`` schema."""
    from kombu import Connection

    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        conn.execute(USER_TABLES)
    with Connection(url) as conn:
        conn.SimpleQueue("celery").put({"the user's": "message"})


def database_contents(url: str) -> dict[str, Any]:
    """Every schema, and every table's row count and a digest of its rows."""
    from psycopg import sql

    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        schemas = [
            r[0]
            for r in conn.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname !~ '^pg_' "
                "AND nspname <> 'information_schema' ORDER BY 1"
            )
        ]
        contents: dict[str, Any] = {"schemas": schemas}
        tables = conn.execute(
            "SELECT schemaname, tablename FROM pg_tables WHERE schemaname = ANY(%s) ORDER BY 1, 2",
            [schemas],
        ).fetchall()
        for schema, table in tables:
            contents[f"{schema}.{table}"] = conn.execute(
                sql.SQL(
                    "SELECT count(*), md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) "
                    "FROM {} t"
                ).format(sql.Identifier(schema, table))
            ).fetchone()
    return contents


def _libpq(url: str) -> str:
    return "postgresql://" + url.partition("://")[2]


def cut_off(app: Any, worker: Celery, queue: str, db_url: str) -> None:
    """``worker`` stops taking messages from ``queue`` (so that a redelivery
    goes elsewhere, or nowhere), then loses its consumers' broker sessions
    (terminated by the server, as by a failover or an operator)."""
    host = socket.gethostname()
    replies = app.control.cancel_consumer(
        queue, destination=[f"{worker.name}@{host}"], reply=True, timeout=10
    )
    assert replies, "no reply to cancel_consumer"
    killed = execute(
        db_url,
        "SELECT pg_terminate_backend(backend_pid) FROM pgbroker.consumer WHERE pid = %s",
        (worker.pid,),
    )
    assert killed and all(k[0] for k in killed)
