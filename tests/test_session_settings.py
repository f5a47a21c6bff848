"""pgbroker's sessions pin the settings they depend on
(pgbroker.database.sessions.session_settings): a database or role whose
defaults differ (REPEATABLE READ or SERIALIZABLE isolation,
idle_session_timeout) must not break the broker, the result backend,
durable steps or beat.

Found by issue 10: with default_transaction_isolation = 'repeatable read',
four competing consumers consumed 0 of 400 messages and died with
SerializationFailure; with idle_session_timeout = '1s', a worker's silent
broker session was closed while its prefetched tasks ran, and every task
was redelivered until dead-lettered.
"""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
import pytest
from kombu import Consumer, Producer, Queue
from psycopg import sql

from tests.apps.delivery_log import runs, setup_run_log
from tests.celery_helpers import celery_env, client_app, execute, start_worker, started, wait_until
from tests.kombu_helpers import connect, drain_until, scalar

APP = "tests.apps.sessions_app"
ISOLATIONS = ["repeatable read", "serializable"]


def set_database_default(db: psycopg.Connection, name: str, value: str) -> None:
    """ALTER DATABASE <this test's database> SET name = value (new sessions)."""
    dbname = db.info.dbname
    db.execute(
        sql.SQL("ALTER DATABASE {} SET {} = {}").format(
            sql.Identifier(dbname), sql.Identifier(name), sql.Literal(value)
        )
    )


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_competing_consumers_under_strict_default_isolation(
    db_url: str, db: psycopg.Connection, isolation: str
) -> None:
    set_database_default(db, "default_transaction_isolation", isolation)
    q = Queue("iso-compete")
    with connect(db_url) as producer_conn:
        producer = Producer(producer_conn.default_channel)
        q(producer_conn.default_channel).declare()
        for i in range(400):
            producer.publish({"n": i}, routing_key=q.name)
    got: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def consume() -> None:
        try:
            with connect(db_url) as conn:

                def on_message(body: dict[str, int], message: object) -> None:
                    with lock:
                        got.append(body["n"])
                    message.ack()  # type: ignore[attr-defined]

                with Consumer(conn, [q], callbacks=[on_message], prefetch_count=10):
                    drain_until(conn, lambda: len(got) >= 400, timeout=60)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=consume) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert sorted(got) == list(range(400))
    assert scalar(db, "SELECT count(*) FROM pgbroker.message") == 0


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_worker_backend_durable_and_beat_under_strict_default_isolation(
    db_url: str, db: psycopg.Connection, tmp_path: Path, isolation: str
) -> None:
    setup_run_log(db)
    set_database_default(db, "default_transaction_isolation", isolation)
    env = celery_env(db_url)
    beat = ["beat", "-l", "info", "-S", "pgbroker", "-s", str(tmp_path / "beat-schedule")]
    with (
        start_worker(APP, env, tmp_path) as worker,
        started("beat", APP, beat, env, tmp_path),
        client_app(APP, db_url) as mod,
    ):
        worker.wait_for_log("ready", timeout=60)
        results = [mod.work.delay(f"t{i}") for i in range(20)]
        assert [r.get(timeout=60) for r in results] == [f"t{i}" for i in range(20)]
        assert mod.steps.delay("d").get(timeout=60) == ["d-1", "d-2"]
        wait_until(lambda: len(runs(db_url, "work", "beat")) >= 2, 30, "two beat runs")
        assert "Error" not in worker.log(), worker.log()
    assert execute(db_url, "SELECT count(*) FROM pgbroker.dead_letter") == [(0,)]


def test_idle_session_timeout_does_not_cut_a_worker_session(
    db_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    """Tasks of 3 s and 8 s, prefetched, on a database that ends sessions
    idle for 1 s: each runs once and succeeds, none is dead-lettered."""
    setup_run_log(db)
    set_database_default(db, "idle_session_timeout", "1s")
    env = celery_env(db_url, TEST_PREFETCH="4")
    keys = [f"k{i}" for i in range(6)]
    with start_worker(APP, env, tmp_path) as worker, client_app(APP, db_url) as mod:
        worker.wait_for_log("ready", timeout=60)
        results = [mod.work.delay(k, 3.0 if i % 2 else 8.0) for i, k in enumerate(keys)]
        assert [r.get(timeout=90) for r in results] == keys
        assert "Connection to broker lost" not in worker.log(), worker.log()
    for k in keys:
        assert len(runs(db_url, "work", k)) == 1, (k, runs(db_url, "work", k))
    assert execute(db_url, "SELECT count(*) FROM pgbroker.dead_letter") == [(0,)]
    assert execute(db_url, "SELECT count(*) FROM pgbroker.redelivery") == [(0,)]


def test_pinned_settings(db_url: str, db: psycopg.Connection) -> None:
    """What each kind of session sees, whatever the database's defaults."""
    for name, value in [
        ("default_transaction_isolation", "serializable"),
        ("idle_session_timeout", "1s"),
        ("statement_timeout", "5s"),
        ("lock_timeout", "3s"),
    ]:
        set_database_default(db, name, value)
    from pgbroker.database.sessions import connect as pg_connect

    show = (
        "SELECT current_setting('transaction_isolation'), current_setting('idle_session_timeout'),"
        " current_setting('statement_timeout'), current_setting('lock_timeout')"
    )
    with pg_connect(db_url) as conn:
        # The role's statement and lock timeouts stay for short statements.
        assert conn.execute(show).fetchone() == ("read committed", "0", "5s", "3s")
    with pg_connect(db_url, waits=True) as conn:
        assert conn.execute(show).fetchone() == ("read committed", "0", "0", "0")
    with pg_connect(db_url, autocommit=False) as conn:
        assert conn.execute(show).fetchone() == ("read committed", "0", "5s", "3s")
    from pgbroker.database import pools

    pool = pools.pool_for(db_url, "pgbroker", purpose="test", auto_migrate=False)
    try:
        with pool.connection() as conn:
            assert conn.execute(show).fetchone() == ("read committed", "0", "5s", "3s")
    finally:
        pools.close_pools("test")
