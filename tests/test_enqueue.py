"""Transactional enqueue (pgbroker.enqueue_in): a message exists if and only
if the caller's transaction committed, and no consumer sees it before."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kombu import Connection, Consumer, Message, Producer, Queue
from psycopg.rows import dict_row

import pgbroker
from pgbroker.broker.enqueue import active_connection, enqueue_in
from pgbroker.errors import EnqueueError
from tests import pgserver
from tests.celery_helpers import celery_env, client_app, start_worker, wait_until
from tests.kombu_helpers import collect, connect, drain_quietly, drain_until, scalar
from tests.test_dedup import running

QUEUE = Queue("orders")


def count(db: psycopg.Connection, table: str = "message") -> int:
    return int(scalar(db, f"SELECT count(*) FROM pgbroker.{table}"))


def publish(conn: Connection, body: Any, **kwargs: Any) -> None:
    Producer(conn.default_channel).publish(body, routing_key=QUEUE.name, declare=[QUEUE], **kwargs)


@pytest.fixture
def broker(db_url: str) -> Iterator[Connection]:
    with connect(db_url) as conn:
        # Declared up front, as a running worker would have: the declaration
        # itself is not part of anyone's transaction.
        QUEUE(conn.default_channel).declare()
        yield conn


@pytest.fixture
def user_conn(db_url: str) -> Iterator[psycopg.Connection]:
    """The application's own connection (not autocommit, like most ORMs')."""
    with psycopg.connect(pgserver.libpq_url(db_url)) as conn:
        yield conn


def test_message_is_invisible_until_commit_then_delivered(
    db_url: str, db: psycopg.Connection, broker: Connection, user_conn: psycopg.Connection
) -> None:
    got: list[Message] = []
    with (
        connect(db_url) as consumer_conn,
        Consumer(consumer_conn, [QUEUE], callbacks=[collect(got)]),
    ):
        with user_conn.transaction():
            user_conn.execute("CREATE TABLE orders (id int)")
            user_conn.execute("INSERT INTO orders VALUES (1)")
            with enqueue_in(user_conn):
                publish(broker, {"order": 1})
            # The transaction is open: no row visible, no NOTIFY sent, and a
            # consumer draining now receives nothing.
            assert count(db) == 0
            drain_quietly(consumer_conn, 1.0)
            assert got == []
        assert count(db) == 1
        drain_until(consumer_conn, lambda: len(got) == 1)
        assert got[0].payload == {"order": 1}
        got[0].ack()


def test_rollback_removes_the_message(
    db: psycopg.Connection, broker: Connection, user_conn: psycopg.Connection
) -> None:
    with pytest.raises(ZeroDivisionError), user_conn.transaction(), enqueue_in(user_conn):
        publish(broker, {"order": 2})
        1 / 0  # noqa: B018 - the application fails after enqueueing
    assert count(db) == 0
    assert count(db, "dead_letter") == 0
    # The broker's own session is untouched and publishes normally.
    publish(broker, {"order": 3})
    assert count(db) == 1


def test_savepoint_rollback_removes_only_its_messages(
    db: psycopg.Connection, broker: Connection, user_conn: psycopg.Connection
) -> None:
    with user_conn.transaction(), enqueue_in(user_conn):
        publish(broker, {"kept": 1})
        with pytest.raises(RuntimeError), user_conn.transaction():
            publish(broker, {"dropped": 1})
            raise RuntimeError("inner step failed")
        publish(broker, {"kept": 2})
    bodies = [r[0] for r in db.execute("SELECT body FROM pgbroker.message ORDER BY id")]
    assert [b"dropped" in bytes(b) for b in bodies] == [False, False]


def test_non_autocommit_connection_commits_with_conn_commit(
    db: psycopg.Connection, broker: Connection, user_conn: psycopg.Connection
) -> None:
    # psycopg's implicit transaction (what SQLAlchemy and Django use).
    with enqueue_in(user_conn):
        publish(broker, {"n": 1})
    assert user_conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    assert count(db) == 0
    user_conn.commit()
    assert count(db) == 1


def test_autocommit_connection_publishes_at_once(
    db_url: str, db: psycopg.Connection, broker: Connection
) -> None:
    with psycopg.connect(pgserver.libpq_url(db_url), autocommit=True) as conn, enqueue_in(conn):
        publish(broker, {"n": 1})
        assert count(db) == 1  # no transaction: committed by the statement
        with conn.transaction():
            publish(broker, {"n": 2})
            assert count(db) == 1  # an explicit block is a transaction
        assert count(db) == 2


def test_nesting_innermost_wins_and_none_publishes_now(
    db_url: str, db: psycopg.Connection, broker: Connection, user_conn: psycopg.Connection
) -> None:
    with psycopg.connect(pgserver.libpq_url(db_url)) as other:
        with enqueue_in(user_conn):
            publish(broker, {"on": "outer"})
            with enqueue_in(other):
                assert active_connection() is other
                publish(broker, {"on": "inner"})
                with enqueue_in(None):
                    assert active_connection() is None
                    publish(broker, {"on": "now"})
                    assert count(db) == 1  # pgbroker's own session: committed
            assert active_connection() is user_conn
            other.rollback()
            publish(broker, {"on": "outer again"})
        assert active_connection() is None
        assert count(db) == 1
        user_conn.commit()
    bodies = [bytes(r[0]) for r in db.execute("SELECT body FROM pgbroker.message")]
    assert sorted(b.decode() for b in bodies) == [
        '{"on": "now"}',
        '{"on": "outer again"}',
        '{"on": "outer"}',
    ]


def test_other_threads_publish_normally(
    db_url: str, db: psycopg.Connection, user_conn: psycopg.Connection
) -> None:
    done = threading.Event()

    def other_thread() -> None:
        # Its own Kombu connection, as Celery's producer pool would give it.
        with connect(db_url) as conn:
            publish(conn, {"from": "thread"})
        done.set()

    with enqueue_in(user_conn):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join(30)
        assert done.is_set()
        assert count(db) == 1  # not held back by this thread's transaction
    user_conn.rollback()
    assert count(db) == 1


def test_asyncio_tasks_are_isolated(
    db_url: str, db: psycopg.Connection, broker: Connection, user_conn: psycopg.Connection
) -> None:
    seen: dict[str, Any] = {}
    entered, outside_done = asyncio.Event(), asyncio.Event()

    async def inside() -> None:
        with enqueue_in(user_conn):
            entered.set()
            # The other task runs meanwhile, all of it while this block is open.
            await asyncio.wait_for(outside_done.wait(), 10)
            seen["inside"] = active_connection()
            publish(broker, {"task": "inside"})

    async def outside() -> None:
        await asyncio.wait_for(entered.wait(), 10)
        seen["outside"] = active_connection()
        publish(broker, {"task": "outside"})
        # asyncio.to_thread copies the caller's context: nothing active here.
        seen["outside_thread"] = await asyncio.to_thread(active_connection)
        outside_done.set()

    async def both() -> None:
        await asyncio.gather(inside(), outside())

    asyncio.run(both())
    assert seen == {"inside": user_conn, "outside": None, "outside_thread": None}
    assert count(db) == 1
    user_conn.commit()
    assert count(db) == 2


def test_any_row_factory_on_the_callers_connection(
    db_url: str, db: psycopg.Connection, broker: Connection
) -> None:
    with psycopg.connect(pgserver.libpq_url(db_url), row_factory=dict_row) as conn:
        with enqueue_in(conn):
            publish(broker, {"n": 1})
            # A message routed nowhere still goes to dead_letter, in the transaction.
            Producer(broker.default_channel).publish({"n": 2}, routing_key="no-such-queue")
        conn.commit()
    assert count(db) == 1
    assert count(db, "dead_letter") == 1


def test_repeatable_read_snapshot_does_not_see_later_queues(
    db_url: str, db: psycopg.Connection, broker: Connection
) -> None:
    # As docs/transactional-enqueue.md says: a queue declared after the
    # snapshot is unknown to the publish; the message is dead-lettered, not lost.
    late = Queue("declared-late")
    with psycopg.connect(pgserver.libpq_url(db_url)) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.execute("SELECT 1 FROM pgbroker.queue LIMIT 1")  # the snapshot is taken
        late(broker.default_channel).declare()
        with enqueue_in(conn):
            Producer(broker.default_channel).publish({"n": 1}, routing_key=late.name)
        conn.commit()
    assert count(db) == 0
    assert scalar(db, "SELECT reason FROM pgbroker.dead_letter") == "unroutable"


def test_serialization_failure_of_the_callers_transaction(
    db_url: str, db: psycopg.Connection, broker: Connection
) -> None:
    """At REPEATABLE READ the caller's transaction can fail at the publish
    (the same task id published meanwhile, elsewhere, by the same task run:
    both write the publish dedup's row): EnqueueError says to run the
    transaction again, with psycopg's error as its cause."""
    headers = {"id": "task-1", "task": "t.x", "retries": 0}
    other = Queue("elsewhere")
    other(broker.default_channel).declare()
    with psycopg.connect(pgserver.libpq_url(db_url)) as conn, running(broker, 1):
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.execute("SELECT 1 FROM pgbroker.queue LIMIT 1")  # the snapshot is taken
        Producer(broker.default_channel).publish({"n": 0}, routing_key=other.name, headers=headers)
        with (
            pytest.raises(EnqueueError, match="run the whole transaction again") as info,
            enqueue_in(conn),
        ):
            Producer(broker.default_channel).publish(
                {"n": 1}, routing_key=QUEUE.name, headers=headers
            )
        assert isinstance(info.value.__cause__, psycopg.errors.SerializationFailure)
        conn.rollback()
    assert count(db) == 1


def test_one_statement_per_publish_and_one_check_per_connection(
    db_url: str, db: psycopg.Connection, broker: Connection
) -> None:
    statements: list[str] = []

    class Counting(psycopg.Cursor[Any]):
        def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
            statements.append(str(query)[:40])
            return super().execute(query, *args, **kwargs)

    with psycopg.connect(pgserver.libpq_url(db_url), cursor_factory=Counting) as conn:
        with enqueue_in(conn):
            for i in range(5):
                publish(broker, {"n": i})
        assert len(statements) == 5 + 1  # the same-database check, once
        conn.commit()
        with enqueue_in(conn):
            for i in range(5):
                publish(broker, {"n": i})
        assert len(statements) == 5 + 1 + 5  # remembered for this connection
        conn.commit()
    assert count(db) == 10


def test_connection_to_a_database_without_the_schema(
    empty_db_url: str, broker: Connection, db: psycopg.Connection
) -> None:
    with (
        psycopg.connect(pgserver.libpq_url(empty_db_url)) as conn,
        pytest.raises(EnqueueError) as info,
        enqueue_in(conn),
    ):
        publish(broker, {"n": 1})
    message = str(info.value)
    assert "has no pgbroker schema 'pgbroker'" in message
    assert "/pgbroker_e_" in message and "broker_url" in message
    assert count(db) == 0


def test_connection_to_another_pgbroker_database(
    pg_admin_url: str, template_db: str, broker: Connection, db: psycopg.Connection
) -> None:
    name = f"pgbroker_t_{uuid.uuid4().hex[:10]}"
    pgserver.create_database(pg_admin_url, name, template=template_db)
    try:
        url = pgserver.libpq_url(pgserver.url_for(pg_admin_url, name))
        with psycopg.connect(url) as conn:
            with (
                pytest.raises(EnqueueError, match="another server, database or schema"),
                enqueue_in(conn),
            ):
                publish(broker, {"n": 1})
            conn.rollback()
            assert conn.execute("SELECT count(*) FROM pgbroker.message").fetchone() == (0,)
    finally:
        pgserver.drop_database(pg_admin_url, name)
    assert count(db) == 0


def test_broken_connection_is_not_retried_as_a_broker_failure(
    db_url: str, db: psycopg.Connection, broker: Connection
) -> None:
    conn = psycopg.connect(pgserver.libpq_url(db_url))
    conn.close()
    with pytest.raises(EnqueueError, match="retry the whole transaction"), enqueue_in(conn):
        # retry=True: Kombu would reconnect and retry a connection error
        # forever; an EnqueueError is not one.
        Producer(broker.default_channel).publish(
            {"n": 1}, routing_key=QUEUE.name, retry=True, retry_policy={"max_retries": 2}
        )
    assert count(db) == 0


def test_role_without_privileges_gets_the_grants_to_run(
    db_url: str, pg_admin_url: str, db: psycopg.Connection, broker: Connection
) -> None:
    role = f"pgb_enq_{uuid.uuid4().hex[:8]}"
    db.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        url = pgserver.libpq_url(db_url).replace("://postgres@", f"://{role}@", 1)
        if role not in url:
            pytest.skip("the test server URL names no user to replace")
        with (
            psycopg.connect(url) as conn,
            pytest.raises(EnqueueError) as info,
            enqueue_in(conn),
        ):
            publish(broker, {"n": 1})
        assert f"the role {role!r} may not publish" in str(info.value)
        assert "GRANT broker_role TO app_role" in str(info.value)
        # The grants the message names are enough.
        db.execute(f'GRANT USAGE ON SCHEMA pgbroker TO "{role}"')
        db.execute(f'GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA pgbroker TO "{role}"')
        with psycopg.connect(url) as conn:
            with enqueue_in(conn):
                publish(broker, {"n": 2})
            assert count(db) == 0
        assert count(db) == 1
    finally:
        db.execute(f'DROP OWNED BY "{role}"')
        db.execute(f'DROP ROLE "{role}"')
    assert count(db) == 1


def test_what_cannot_be_used() -> None:
    with (
        pytest.raises(TypeError, match="AsyncConnection"),
        enqueue_in(psycopg.AsyncConnection.__new__(psycopg.AsyncConnection)),
    ):
        pass
    with pytest.raises(TypeError, match="needs a psycopg 3 Connection"), enqueue_in("dsn"):
        pass


def test_sqlalchemy_session_and_connection_are_unwrapped(
    db_url: str, db: psycopg.Connection, broker: Connection
) -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from sqlalchemy.orm import Session

    engine = sqlalchemy.create_engine("postgresql+psycopg://" + db_url.partition("://")[2])
    try:
        with Session(engine) as session:
            with enqueue_in(session) as raw:
                assert raw is session.connection().connection.driver_connection
                publish(broker, {"via": "session"})
            assert count(db) == 0
            session.commit()
        with engine.connect() as connection:
            with enqueue_in(connection) as raw:
                assert raw is connection.connection.driver_connection
                publish(broker, {"via": "connection"})
            connection.rollback()
    finally:
        engine.dispose()
    assert count(db) == 1


def test_exported_from_the_package() -> None:
    assert pgbroker.enqueue_in is enqueue_in
    assert pgbroker.EnqueueError is EnqueueError


# --- Celery ------------------------------------------------------------------------


def test_celery_delay_goes_through_the_producer_pool_into_the_transaction(
    db_url: str, db: psycopg.Connection, user_conn: psycopg.Connection
) -> None:
    with client_app("tests.apps.basic", db_url) as mod:
        with enqueue_in(user_conn):
            committed = mod.add.delay(1, 2)
            mod.add.apply_async((3, 4), priority=5)
        assert count(db) == 0
        user_conn.commit()
        with enqueue_in(user_conn):
            mod.add.delay(5, 6)
        user_conn.rollback()
        rows = db.execute(
            "SELECT task_id, task_name, priority FROM pgbroker.message ORDER BY id"
        ).fetchall()
    assert [r[1] for r in rows] == ["tests.apps.basic.add"] * 2
    assert rows[0][0] == committed.id
    assert [r[2] for r in rows] == [0, 5]


def test_celery_worker_runs_the_task_only_after_commit(
    db_url: str, user_conn: psycopg.Connection, tmp_path: Path
) -> None:
    env = celery_env(db_url)
    with (
        client_app("tests.apps.basic", db_url) as mod,
        start_worker("tests.apps.basic", env, tmp_path) as worker,
    ):
        worker.wait_for_log("ready.", timeout=60)
        rolled_back = None
        with enqueue_in(user_conn):
            rolled_back = mod.add.delay(100, 1)
        user_conn.rollback()
        with enqueue_in(user_conn):
            result = mod.add.delay(2, 2)
            later = mod.add.apply_async((3, 3), countdown=1)
        # The worker is idle and listening; the task waits for the commit.
        with pytest.raises(Exception, match=r"timed out|Timeout"):
            result.get(timeout=2)
        user_conn.commit()
        assert result.get(timeout=60) == 4
        assert later.get(timeout=60) == 6
        wait_until(lambda: "add[" in worker.log(), 30, "the worker to log the task")
        assert rolled_back.id not in worker.log()
        assert result.id in worker.log()
