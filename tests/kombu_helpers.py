"""Small helpers for the Kombu-level transport tests."""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
from kombu import Connection, Message

#: Short sweeps so recovery and expiry tests finish quickly.
FAST = {"sweep_interval": 0.3}


def connect(url: str, **options: Any) -> Connection:
    """A connected Kombu connection with the given transport options."""
    conn = Connection(url, transport_options={**FAST, **options})
    conn.connect()
    return conn


def drain_until(conn: Connection, done: Callable[[], object], timeout: float = 10.0) -> None:
    """Call drain_events until done() is true; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"condition not reached within {timeout} s")
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=min(remaining, 1.0))


def drain_more(conn: Connection, received: list[Any], timeout: float = 10.0) -> None:
    """Drain events until received grows."""
    n = len(received)
    drain_until(conn, lambda: len(received) > n, timeout)


def drain_quietly(conn: Connection, seconds: float) -> None:
    """Drain events for a while, expecting nothing in particular."""
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            conn.drain_events(timeout=remaining)
        except TimeoutError:
            return


def collect(received: list[Message]) -> Callable[[Any, Message], None]:
    """A Kombu callback that keeps messages without acking them."""

    def on_message(body: Any, message: Message) -> None:
        received.append(message)

    return on_message


def rows(db: psycopg.Connection, query: str, *params: Any) -> list[tuple[Any, ...]]:
    return db.execute(query, params).fetchall()


def length_is(items: Sequence[Any], n: int) -> Callable[[], bool]:
    """A drain_until condition: ``items`` holds ``n`` entries."""
    return lambda: len(items) == n


def scalar(db: psycopg.Connection, query: str, *params: Any) -> Any:
    row = db.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def wait_for(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll check() until it returns something true; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout} s (last: {value!r})")
        time.sleep(interval)


class Child:
    """A Python child process whose stdout lines are read by a thread."""

    def __init__(self, code: str, url: str, **env: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            env={**os.environ, "TEST_URL": url, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self._stderr: str | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def read_line(self, timeout: float = 15.0) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"child wrote nothing within {timeout} s (exit code {self.proc.poll()})"
            ) from None

    def stderr(self) -> str:
        if self._stderr is not None:
            return self._stderr
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        self._stderr = self.proc.stderr.read()
        return self._stderr

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        # Close the pipes (a ResourceWarning otherwise), once read to the end.
        self._reader.join(timeout=10)
        if self._reader.is_alive():  # a grandchild holds the pipe: leave it be
            return
        self.stderr()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def run(code: str, url: str, timeout: float = 30.0, **env: str) -> str:
    """Run Python code in a child process; return its stdout, fail on error."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "TEST_URL": url, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


@contextlib.contextmanager
def role_granted_before(db_url: str, prefix: str, created_later: str) -> Iterator[str]:
    """A login role (its name yielded) granted pgbroker's schema and tables
    as an application role was before the migration that created
    ``created_later`` (GRANT ... ON ALL TABLES covers only what exists
    then): no privilege on that table or view. Dropped afterwards."""
    role = prefix + db_url.rsplit("_", 1)[-1]
    with psycopg.connect(db_url, autocommit=True) as db:
        db.execute(f'CREATE ROLE "{role}" LOGIN')
        db.execute(f'GRANT USAGE ON SCHEMA pgbroker TO "{role}"')
        db.execute(
            f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgbroker TO "{role}"'
        )
        db.execute(f'REVOKE ALL ON pgbroker.{created_later} FROM "{role}"')
    try:
        yield role
    finally:
        with psycopg.connect(db_url, autocommit=True) as db:
            db.execute(f'DROP OWNED BY "{role}"')
            db.execute(f'DROP ROLE "{role}"')
