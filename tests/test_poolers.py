"""A pooler that does not keep sessions is refused at connect
(pgbroker.database.poolers): PgBouncer in transaction or statement pool
mode, with an error that names the cause and the fix, never the password,
and that Kombu and Celery do not retry. Session pooling, a direct
connection and a TCP proxy pass; a direct connection runs no probe; the
probe does not hang on a session pool with no server connection to spare.

Real PgBouncers (tests/test_pgbouncer.py's ``pgbouncer``, skipped when it
is not installed unless PGBROKER_REQUIRE_PGBOUNCER is set) in front of the
test's database. They require a password (auth_type md5): the probe's
second session must log in with the URL's.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from celery import Celery
from kombu import Connection

from pgbroker.database import poolers, sessions
from pgbroker.database.pools import close_app
from pgbroker.errors import CONNECTION_ERRORS, UnsupportedPooler
from tests.test_pgbouncer import pgbouncer

PASSWORD = "Pgb-p00l-7731"  # PgBouncer's, in every URL through it; must never show


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[Any, Any]]:
    """No verdict of another test: each test's PgBouncer is probed anew."""
    verdicts: dict[Any, Any] = {}
    monkeypatch.setattr(poolers, "_verdicts", verdicts)
    yield verdicts


def forget_verdicts() -> None:
    poolers._verdicts.clear()


def assert_explains(exc: BaseException, url: str) -> None:
    message = str(exc)
    port = urlsplit(url).port
    assert f"postgres@127.0.0.1:{port}/" in message, message  # where
    assert "pgbroker needs session pooling" in message, message
    assert "transaction or statement pool mode" in message, message  # the cause
    assert "LISTEN and session advisory locks" in message, message
    assert "set pool_mode = session" in message, message  # the fix
    assert "connect to PostgreSQL directly" in message, message
    assert PASSWORD not in message
    assert not isinstance(exc, CONNECTION_ERRORS)  # Kombu and Celery would retry it forever


def celery_app(url: str) -> Celery:
    app = Celery("t", broker=url, backend=url, set_as_current=False)
    app.conf.broker_connection_retry_on_startup = False
    return app


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pool_mode", ["transaction", "statement"])
def test_a_pooler_that_does_not_keep_sessions_is_refused(
    db_url: str, pool_mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with pgbouncer(db_url, pool_mode, password=PASSWORD) as url:
        assert PASSWORD in url
        # Kombu: connect, and publish.
        with Connection(url) as conn, pytest.raises(UnsupportedPooler) as refused:
            conn.connect()
        assert_explains(refused.value, url)
        forget_verdicts()
        started = time.monotonic()
        with Connection(url) as conn, pytest.raises(UnsupportedPooler) as refused:
            # Not a connection error: no retry loop, whatever max_retries says.
            conn.ensure_connection(max_retries=100, interval_start=1, interval_step=1)
        assert time.monotonic() - started < 10
        assert_explains(refused.value, url)
        forget_verdicts()
        with Connection(url) as conn, pytest.raises(UnsupportedPooler) as refused:
            conn.Producer().publish({"n": 1}, routing_key="pooled")
        assert_explains(refused.value, url)
        # Celery: the result backend (its pool's first session) and a publish.
        forget_verdicts()
        app = celery_app(url)
        try:
            with pytest.raises(UnsupportedPooler) as refused:
                app.backend.get_task_meta(str(uuid.uuid4()))
            assert_explains(refused.value, url)
            forget_verdicts()
            with pytest.raises(UnsupportedPooler) as refused:
                app.send_task("tests.nothing", retry=True)
            assert_explains(refused.value, url)
        finally:
            close_app(app)
    assert all(PASSWORD not in record.getMessage() for record in caplog.records)


@pytest.mark.timeout(60)
def test_the_refusal_is_kept(db_url: str) -> None:
    with pgbouncer(db_url, "transaction", password=PASSWORD) as url:
        before = poolers.probes
        for _ in range(3):
            with pytest.raises(UnsupportedPooler):
                sessions.connect(url)
        assert poolers.probes == before + 1  # once per process and endpoint


@pytest.mark.timeout(60)
def test_session_pooling_connects_publishes_and_gets(db_url: str) -> None:
    with pgbouncer(db_url, "session", password=PASSWORD) as url:
        before = poolers.probes
        with Connection(url) as conn:
            queue = conn.SimpleQueue("through-pgbouncer")
            queue.put({"n": 1})
            assert queue.get(timeout=10).payload == {"n": 1}
            queue.close()
        app = celery_app(url)
        try:
            assert app.backend.get_task_meta(str(uuid.uuid4()))["status"] == "PENDING"
        finally:
            close_app(app)
        # The probe ran (PgBouncer gives its own cancel key), once.
        assert poolers.probes == before + 1


@pytest.mark.timeout(60)
def test_the_probe_does_not_hang_on_an_exhausted_session_pool(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The one server connection goes to the session being checked: the
    # probe's second session waits in PgBouncer's queue until it gives up.
    with pgbouncer(db_url, "session", password=PASSWORD, default_pool_size=1) as url:
        caplog.set_level(logging.INFO, logger="pgbroker.database")
        started = time.monotonic()
        with sessions.connect(url) as conn:
            elapsed = time.monotonic() - started
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert elapsed < poolers.PROBE_TIMEOUT + 3, elapsed
        skipped = [r.getMessage() for r in caplog.records if "could not tell" in r.getMessage()]
        assert skipped and "keeps sessions" in skipped[0], caplog.text
        assert PASSWORD not in caplog.text


@pytest.fixture
def counted_checks(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often poolers.check and poolers._probe run."""
    counts = {"checks": 0, "probes": 0}
    check, probe = poolers.check, poolers._probe

    def counted_check(*args: Any, **kwargs: Any) -> None:
        counts["checks"] += 1
        check(*args, **kwargs)

    def counted_probe(*args: Any, **kwargs: Any) -> str | None:
        counts["probes"] += 1
        return probe(*args, **kwargs)

    monkeypatch.setattr(poolers, "check", counted_check)
    monkeypatch.setattr(poolers, "_probe", counted_probe)
    return counts


@pytest.mark.timeout(60)
def test_a_direct_connection_runs_no_probe(db_url: str, counted_checks: dict[str, int]) -> None:
    with Connection(db_url) as conn:
        queue = conn.SimpleQueue("direct")
        queue.put({"n": 1})
        assert queue.get(timeout=10).payload == {"n": 1}
        queue.close()
    app = celery_app(db_url)
    try:
        assert app.backend.get_task_meta(str(uuid.uuid4()))["status"] == "PENDING"
    finally:
        close_app(app)
    assert counted_checks["checks"] >= 2  # every session is checked...
    assert counted_checks["probes"] == 0  # ...at no cost: the server's own key


@contextlib.contextmanager
def tcp_proxy(db_url: str) -> Iterator[str]:
    """A TCP proxy (as HAProxy in front of Patroni) to ``db_url``'s server;
    yields the URL of the same database through it."""
    server = urlsplit(db_url)
    target = (server.hostname or "127.0.0.1", server.port or 5432)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def pipe(client: socket.socket) -> None:
        with client, socket.create_connection(target, timeout=10) as upstream:
            client.settimeout(10)
            ends = {client: upstream, upstream: client}
            while not stop.is_set():
                readable, _, _ = select.select(list(ends), [], [], 0.2)
                for end in readable:
                    try:
                        data = end.recv(65536)
                        if data:
                            ends[end].sendall(data)
                    except OSError:
                        return
                    if not data:
                        return

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=pipe, args=(client,), daemon=True)
            thread.start()
            threads.append(thread)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        netloc = f"{server.username or 'postgres'}@127.0.0.1:{port}"
        yield urlunsplit(server._replace(netloc=netloc))
    finally:
        stop.set()
        acceptor.join(5)
        for thread in threads:
            thread.join(5)
        listener.close()


@pytest.mark.timeout(60)
def test_a_tcp_proxy_passes_without_a_probe(db_url: str, counted_checks: dict[str, int]) -> None:
    with tcp_proxy(db_url) as url:
        assert urlsplit(url).port != (urlsplit(db_url).port or 5432)
        with sessions.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with Connection(url) as conn:
            queue = conn.SimpleQueue("proxied")
            queue.put({"n": 1})
            assert queue.get(timeout=10).payload == {"n": 1}
            queue.close()
    assert counted_checks["checks"] >= 2
    assert counted_checks["probes"] == 0
