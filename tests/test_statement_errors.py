"""A statement's own error is not a lost connection (issue 10, "Statement
errors are classed as connection losses").

psycopg raises OperationalError for a statement timeout, a lock timeout or
a serialization failure as well as for a session that is gone. Kombu and
Celery reconnect on the transport's ``connection_errors``, and a
reconnection hands back every message the consumer held: only a lost
session may be one (pgbroker.errors.ConnectionLost). The others are channel
errors: the session and the consumer's messages are kept.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from kombu import Connection, Consumer, Message, Producer, Queue
from psycopg import sql

from pgbroker.errors import ConnectionLost
from tests import pgserver
from tests.apps.delivery_log import runs, setup_run_log
from tests.celery_helpers import celery_env, client_app, execute, start_worker
from tests.kombu_helpers import collect, connect, drain_until, rows, scalar, wait_for

APP = "tests.apps.sessions_app"


def set_database_default(db: psycopg.Connection, name: str, value: str) -> None:
    db.execute(
        sql.SQL("ALTER DATABASE {} SET {} = {}").format(
            sql.Identifier(db.info.dbname), sql.Identifier(name), sql.Literal(value)
        )
    )


@contextlib.contextmanager
def message_table_locked(db_url: str) -> Iterator[None]:
    """Another session holds a lock that makes every claim, ack and publish
    wait (reads go on)."""
    with psycopg.connect(pgserver.libpq_url(db_url)) as other:
        other.execute("LOCK TABLE pgbroker.message IN EXCLUSIVE MODE")
        yield
        other.rollback()


def assert_channel_error(conn: Connection, error: BaseException) -> None:
    assert isinstance(error, conn.channel_errors), error
    assert not isinstance(error, conn.connection_errors), error
    assert isinstance(error, conn.recoverable_channel_errors)
    assert not isinstance(error, conn.recoverable_connection_errors)


@pytest.mark.parametrize(
    ("setting", "value", "error"),
    [
        ("lock_timeout", "200ms", psycopg.errors.LockNotAvailable),
        ("statement_timeout", "300ms", psycopg.errors.QueryCanceled),
    ],
)
def test_timeouts_are_channel_errors_and_the_consumer_keeps_its_messages(
    db_url: str, db: psycopg.Connection, setting: str, value: str, error: type[Exception]
) -> None:
    q = Queue("stmt-errors")
    with connect(db_url) as producer_conn:
        producer = Producer(producer_conn.default_channel)
        q(producer_conn.default_channel).declare()
        for i in range(5):
            producer.publish({"i": i}, routing_key=q.name)
    set_database_default(db, setting, value)  # for the sessions opened from here
    got: list[Message] = []
    with connect(db_url) as conn, connect(db_url) as publisher:
        with Consumer(conn, [q], callbacks=[collect(got)], prefetch_count=3):
            drain_until(conn, lambda: len(got) == 3)
            consumer_id = conn.transport.consumer_id
            backend_pid = conn.transport._conn.info.backend_pid
            got[0].ack()
            with message_table_locked(db_url):
                # An ack waits for the lock, then fails: a channel error.
                with pytest.raises(error) as ack_failed:
                    got[1].ack()
                assert_channel_error(conn, ack_failed.value)
                # So does a claim...
                with pytest.raises(error) as claim_failed:
                    conn.drain_events(timeout=2)
                assert_channel_error(conn, claim_failed.value)
                # ...and a publish.
                with pytest.raises(error) as publish_failed:
                    Producer(publisher.default_channel).publish(
                        {"i": 99}, routing_key=q.name, retry=False
                    )
                assert_channel_error(publisher, publish_failed.value)
            # The same session and consumer: nothing went back to the queue.
            assert conn.transport._conn.info.backend_pid == backend_pid
            assert conn.transport.consumer_id == consumer_id
            assert scalar(db, "SELECT count(*) FROM pgbroker.redelivery") == 0
            assert rows(
                db, "SELECT consumer_id, count(*) FROM pgbroker.message GROUP BY 1 ORDER BY 1"
            ) == [(consumer_id, 2), (None, 2)]
            got[1].ack()  # again, now that it can be written
            got[2].ack()
            drain_until(conn, lambda: len(got) == 5)
            for m in got[3:]:
                m.ack()
        assert scalar(db, "SELECT count(*) FROM pgbroker.message") == 0
    assert scalar(db, "SELECT count(*) FROM pgbroker.redelivery") == 0


def test_a_terminated_session_is_a_connection_error(db_url: str, db: psycopg.Connection) -> None:
    q = Queue("stmt-lost")
    got: list[Message] = []
    with connect(db_url) as conn:
        Producer(conn.default_channel).publish({"i": 0}, routing_key=q.name, declare=[q])
        with Consumer(conn, [q], callbacks=[collect(got)]):
            drain_until(conn, lambda: len(got) == 1)
            pid = conn.transport._conn.info.backend_pid
            db.execute("SELECT pg_terminate_backend(%s)", [pid])
            wait_for(lambda: not rows(db, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", pid))
            with pytest.raises(ConnectionLost) as lost:
                conn.drain_events(timeout=2)
            assert isinstance(lost.value, conn.connection_errors)
            assert isinstance(lost.value, conn.recoverable_connection_errors)
            assert isinstance(lost.value, psycopg.OperationalError)


def test_worker_rides_out_lock_timeouts_without_reconnecting(
    db_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    """A real worker whose claims and acks hit lock_timeout for a while keeps
    its session (no "Connection to broker lost") and runs each task once."""
    setup_run_log(db)
    set_database_default(db, "lock_timeout", "100ms")
    env = celery_env(db_url, TEST_PREFETCH="2")
    keys = [f"k{i}" for i in range(8)]
    with start_worker(APP, env, tmp_path) as worker, client_app(APP, db_url) as mod:
        worker.wait_for_log("ready", timeout=60)
        first = [mod.work.delay(k, 0.5) for k in keys[:4]]
        with message_table_locked(db_url):
            # On purpose: the lock is held a while, so that claims and acks
            # hit lock_timeout (100 ms) again and again.
            time.sleep(2.5)
        rest = [mod.work.delay(k, 0.5) for k in keys[4:]]
        assert [r.get(timeout=60) for r in first + rest] == keys
        log = worker.log()
        assert "Connection to broker lost" not in log, log
        assert "a statement on the consumer's session failed (LockNotAvailable" in log, log
    for k in keys:
        assert len(runs(db_url, "work", k)) == 1, (k, runs(db_url, "work", k))
    assert execute(db_url, "SELECT count(*) FROM pgbroker.redelivery") == [(0,)]
