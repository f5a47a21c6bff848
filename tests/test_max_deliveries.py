"""Dead-letter after ``max_deliveries``: a message that keeps killing its
consumer (or keeps being requeued) stops coming back.

Kombu-level tests cover the requeue path, the dead-consumer path of the
sweep and results that are already final; Celery tests use real workers
that a task SIGKILLs on every delivery.
"""

from __future__ import annotations

import signal
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery.exceptions import WorkerLostError
from kombu import Consumer, Message, Producer, Queue

from tests.apps.delivery_log import runs, setup_run_log
from tests.celery_helpers import celery_env, client_app, execute, start_worker, wait_until
from tests.kombu_helpers import Child, collect, connect, drain_until, length_is, rows, scalar

APP = "tests.apps.delivery_app"


def task_headers(task_id: str) -> dict[str, Any]:
    return {"id": task_id, "task": "t.poison", "retries": 0}


def result_of(db: psycopg.Connection, task_id: str) -> tuple[str, Any] | None:
    row = db.execute(
        "SELECT state, convert_from(result, 'UTF8')::json FROM pgbroker.task_result "
        "WHERE task_id = %s",
        [task_id],
    ).fetchone()
    return None if row is None else (row[0], row[1])


def test_requeued_max_deliveries_times_goes_to_dead_letter(
    db_url: str, db: psycopg.Connection
) -> None:
    q = Queue("md-requeue")
    task_id = str(uuid.uuid4())
    got: list[Message] = []
    with connect(db_url, max_deliveries=3) as conn:
        producer = Producer(conn.default_channel)
        producer.publish("poison", routing_key=q.name, declare=[q], headers=task_headers(task_id))
        producer.publish("plain", routing_key=q.name)
        with Consumer(conn, [q], callbacks=[collect(got)]):
            for n in range(1, 4):
                drain_until(conn, length_is(got, 2 * n))
                for m in got[-2:]:
                    m.requeue()
            # Both were requeued a third time: dead-lettered, not back.
            assert scalar(db, "SELECT count(*) FROM pgbroker.message") == 0
    assert rows(
        db, "SELECT reason, task_id, delivery_count FROM pgbroker.dead_letter ORDER BY task_id"
    ) == [("max deliveries (requeued)", task_id, 3), ("max deliveries (requeued)", None, 3)]
    assert rows(
        db,
        "SELECT reason, count(*) FROM pgbroker.redelivery WHERE task_id = %s GROUP BY 1 ORDER BY 1",
        task_id,
    ) == [("max deliveries (requeued)", 1), ("requeued", 2)]
    state, exc = result_of(db, task_id)  # type: ignore[misc]
    assert state == "FAILURE"
    assert exc["exc_type"] == "Reject" and "max_deliveries=3" in exc["exc_message"][0]


def test_restored_at_close_is_never_dead_lettered(db_url: str, db: psycopg.Connection) -> None:
    """Messages a consumer held unacked when its channel closed go back (the
    delivery counts, so they are redelivered), but are not dead-lettered."""
    q = Queue("md-restore")
    with connect(db_url, max_deliveries=2) as producer_conn:
        Producer(producer_conn.default_channel).publish("held", routing_key=q.name, declare=[q])
    for _ in range(4):
        got: list[Message] = []
        with (
            connect(db_url, max_deliveries=2) as conn,
            Consumer(conn, [q], callbacks=[collect(got)]),
        ):
            drain_until(conn, length_is(got, 1))
    assert rows(db, "SELECT state, delivery_count FROM pgbroker.message") == [("ready", 4)]
    assert scalar(db, "SELECT count(*) FROM pgbroker.dead_letter") == 0
    assert rows(db, "SELECT DISTINCT reason FROM pgbroker.redelivery") == [("restored at close",)]


def _kill_session(db: psycopg.Connection, conn: Any) -> None:
    pid = conn.transport._conn.info.backend_pid
    db.execute("SELECT pg_terminate_backend(%s)", [pid])


# A consumer in a process of its own that takes one message, says so, and
# holds it until the test SIGKILLs the process.
VICTIM = """
import os, time
from kombu import Connection, Consumer, Queue
got = []
conn = Connection(os.environ["TEST_URL"],
                  transport_options={"max_deliveries": 3, "sweep_interval": 3600})
with Consumer(conn, [Queue(os.environ["QUEUE"])], callbacks=[lambda b, m: got.append(b)],
              prefetch_count=1):
    while not got:
        try:
            conn.drain_events(timeout=1)
        except TimeoutError:
            pass
    print("holding", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("final", [None, "SUCCESS"])
def test_consumer_dying_max_deliveries_times(
    db_url: str, db: psycopg.Connection, final: str | None
) -> None:
    """The sweep's dead-consumer path: after the third SIGKILL of the process
    holding it, the message goes to dead_letter and the task gets FAILURE,
    unless its result is final."""
    q = Queue("md-dead")
    task_id = str(uuid.uuid4())
    if final:
        db.execute(
            "INSERT INTO pgbroker.task_result (task_id, state, result, content_type, "
            "content_encoding) VALUES (%s, %s, '1', 'application/json', 'utf-8')",
            [task_id, final],
        )
    with connect(db_url, max_deliveries=3, sweep_interval=3600) as sweeper:
        Producer(sweeper.default_channel).publish(
            "poison", routing_key=q.name, declare=[q], headers=task_headers(task_id)
        )
        for death in range(1, 4):
            with Child(VICTIM, db_url, QUEUE=q.name) as victim:
                assert victim.read_line() == "holding"
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait(10)
            # Once the server has ended the session (its lock is free), a
            # live connection's sweep recovers the message.
            wait_until(
                lambda: (
                    sweeper.transport.sweep() is not None
                    and scalar(db, "SELECT count(*) FROM pgbroker.consumer") == 0
                ),
                10,
                f"death {death} to be swept",
            )
    reasons = [r[0] for r in rows(db, "SELECT reason FROM pgbroker.redelivery ORDER BY id")]
    assert reasons == ["consumer died", "consumer died", "max deliveries (consumer died)"]
    assert rows(db, "SELECT reason, delivery_count FROM pgbroker.dead_letter") == [
        ("max deliveries (consumer died)", 3)
    ]
    assert scalar(db, "SELECT count(*) FROM pgbroker.message") == 0
    state, exc = result_of(db, task_id)  # type: ignore[misc]
    if final:
        assert (state, exc) == (final, 1)
    else:
        assert state == "FAILURE" and exc["exc_type"] == "WorkerLostError"
        assert exc["exc_message"] == [
            "pgbroker: delivered 3 times without an ack (max_deliveries=3), the last time "
            "to a worker process that died holding it; the message is in the dead_letter table"
        ]


def test_lost_session_of_a_live_process_is_not_counted(db_url: str, db: psycopg.Connection) -> None:
    """A consumer's session terminated while its process lives (this one,
    whose other sessions hold its key): the message goes back with reason
    'session lost', however often, and is never dead-lettered for it. A
    process death afterwards counts as usual, and the FAILURE says both."""
    q = Queue("md-lost")
    task_id = str(uuid.uuid4())
    with connect(db_url, max_deliveries=2, sweep_interval=3600) as sweeper:
        Producer(sweeper.default_channel).publish(
            "task", routing_key=q.name, declare=[q], headers=task_headers(task_id)
        )
        for loss in range(1, 5):
            got: list[Message] = []
            victim = connect(db_url, max_deliveries=2, sweep_interval=3600)
            try:
                Consumer(victim, [q], callbacks=[collect(got)]).consume()
                drain_until(victim, length_is(got, 1))
                _kill_session(db, victim)
            finally:
                victim.release()  # its session is gone: the errors are logged
            wait_until(
                lambda: (
                    sweeper.transport.sweep() is not None
                    and scalar(db, "SELECT count(*) FROM pgbroker.consumer") == 0
                ),
                10,
                f"loss {loss} to be swept",
            )
        assert rows(db, "SELECT state, delivery_count FROM pgbroker.message") == [("ready", 4)]
        assert scalar(db, "SELECT count(*) FROM pgbroker.dead_letter") == 0
        # Two deaths of the process holding it: now it is dead-lettered.
        for _ in range(2):
            with Child(VICTIM, db_url, QUEUE=q.name) as child:
                assert child.read_line() == "holding"
                child.proc.send_signal(signal.SIGKILL)
                child.proc.wait(10)
            wait_until(
                lambda: (
                    sweeper.transport.sweep() is not None
                    and scalar(db, "SELECT count(*) FROM pgbroker.consumer") == 0
                ),
                10,
                "the death to be swept",
            )
    assert [r[0] for r in rows(db, "SELECT reason FROM pgbroker.redelivery ORDER BY id")] == [
        *["session lost"] * 4,
        "consumer died",
        "max deliveries (consumer died)",
    ]
    assert rows(db, "SELECT reason, delivery_count FROM pgbroker.dead_letter") == [
        ("max deliveries (consumer died)", 6)
    ]
    state, exc = result_of(db, task_id)  # type: ignore[misc]
    assert state == "FAILURE" and exc["exc_type"] == "WorkerLostError"
    assert exc["exc_message"] == [
        "pgbroker: delivered 2 times without an ack (max_deliveries=2), the last time to a "
        "worker process that died holding it (4 more deliveries ended with only the worker's "
        "database session lost: not counted); the message is in the dead_letter table"
    ]


def test_max_deliveries_zero_means_no_limit(db_url: str, db: psycopg.Connection) -> None:
    q = Queue("md-unlimited")
    got: list[Message] = []
    with connect(db_url, max_deliveries=0) as conn:
        Producer(conn.default_channel).publish("again", routing_key=q.name, declare=[q])
        with Consumer(conn, [q], callbacks=[collect(got)]):
            for n in range(1, 13):
                drain_until(conn, length_is(got, n))
                got[-1].requeue()
    assert rows(db, "SELECT delivery_count FROM pgbroker.message") == [(12,)]
    assert scalar(db, "SELECT count(*) FROM pgbroker.dead_letter") == 0


# --- Celery: tasks that SIGKILL their worker on every delivery ----------------------------


def test_task_killing_its_whole_worker_ends_in_dead_letter(
    db_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    """Each delivery SIGKILLs the worker (main process and pool): the next
    worker's sweep redelivers it, until the third death; then it is
    dead-lettered, ``get()`` raises, and the worker serves other tasks."""
    setup_run_log(db)
    env = celery_env(db_url, TEST_SWEEP_INTERVAL="1", TEST_MAX_DELIVERIES="3")
    with client_app(APP, db_url) as tasks:
        result = tasks.kill_worker.delay("poison")
        for death in range(1, 4):
            with start_worker(APP, env, tmp_path, name=f"w{death}") as w:
                assert w.wait_exit(60) == -9, w.log()
            assert len(runs(db_url, "kill_worker", "poison")) == death
        with start_worker(APP, env, tmp_path, name="survivor") as w:
            w.wait_for_log("ready.")
            with pytest.raises(WorkerLostError, match="max_deliveries=3"):
                result.get(timeout=60)
            assert tasks.record.delay("after").get(timeout=60) == "after"
        assert len(runs(db_url, "kill_worker", "poison")) == 3
        assert execute(
            db_url, "SELECT reason, delivery_count, task_id FROM pgbroker.dead_letter"
        ) == [("max deliveries (consumer died)", 3, result.id)]


def test_task_killing_its_pool_process_ends_in_dead_letter(
    db_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    """With reject_on_worker_lost, each death of the pool process requeues
    the message (the requeue path); the worker itself lives on and keeps
    serving other tasks."""
    setup_run_log(db)
    env = celery_env(db_url, TEST_SWEEP_INTERVAL="1", TEST_MAX_DELIVERIES="3")
    with start_worker(APP, env, tmp_path) as w, client_app(APP, db_url) as tasks:
        w.wait_for_log("ready.")
        result = tasks.kill_child.delay("poison")
        wait_until(
            lambda: execute(db_url, "SELECT reason FROM pgbroker.dead_letter"),
            90,
            "the message to be dead-lettered",
        )
        assert execute(db_url, "SELECT reason, delivery_count FROM pgbroker.dead_letter") == [
            ("max deliveries (requeued)", 3)
        ]
        assert len(runs(db_url, "kill_child", "poison")) == 3
        assert tasks.record.delay("after").get(timeout=60) == "after"
        assert w.proc.poll() is None
        state = wait_until(
            lambda: execute(
                db_url, "SELECT state FROM pgbroker.task_result WHERE task_id = %s", (result.id,)
            ),
            30,
            "a result",
        )
        assert state == [("FAILURE",)]


def test_worker_whose_session_is_terminated_keeps_its_task_alive(
    db_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    """A real worker's consumer session is terminated three times while it
    runs an acks_late task (max_deliveries=2): the worker lives, so each
    loss is 'session lost', not counted; the task is never dead-lettered and
    ends in SUCCESS."""
    setup_run_log(db)
    app = "tests.apps.sessions_app"
    env = celery_env(db_url, TEST_MAX_DELIVERIES="2", TEST_PREFETCH="1")
    with start_worker(app, env, tmp_path) as w, client_app(app, db_url) as tasks:
        w.wait_for_log("ready.")
        result = tasks.work.delay("long", 6.0)
        for loss in range(1, 4):
            wait_until(
                lambda: execute(
                    db_url,
                    "SELECT 1 FROM pgbroker.message WHERE state = 'reserved' AND consumer_id IN"
                    " (SELECT id FROM pgbroker.consumer)",
                ),
                30,
                f"the task to be held by a live consumer (loss {loss})",
            )
            execute(
                db_url,
                "SELECT pg_terminate_backend(c.backend_pid) FROM pgbroker.consumer c"
                " JOIN pgbroker.message m ON m.consumer_id = c.id",
            )

            def recovered(loss: int = loss) -> bool:
                return len(execute(db_url, "SELECT 1 FROM pgbroker.redelivery")) >= loss

            wait_until(
                recovered,
                30,
                f"loss {loss} to be recovered",
            )
        assert result.get(timeout=60) == "long"
        assert w.proc.poll() is None
    # (Copies still held when the worker stopped were restored at close.)
    assert execute(
        db_url,
        "SELECT reason, count(*) FROM pgbroker.redelivery"
        " WHERE reason <> 'restored at close' GROUP BY 1",
    ) == [("session lost", 3)]
    assert execute(db_url, "SELECT count(*) FROM pgbroker.dead_letter") == [(0,)]
