"""Broker-side ETA: a message with a future ``eta`` waits in PostgreSQL as
'delayed', invisible to claims, and is delivered once, on time.

Kombu-level tests cover the blocking ``drain_events`` path and the idle
query count; Celery tests (real prefork workers, Kombu's event loop) cover
countdown tasks and a far-future task surviving a SIGKILLed worker.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kombu import Connection, Consumer, Message, Producer, Queue

from pgbroker.broker.delayed import due_channel_for
from tests.apps.delivery_log import runs, setup_run_log
from tests.celery_helpers import (
    celery_env,
    client_app,
    execute,
    run_celery,
    start_worker,
)
from tests.kombu_helpers import collect, connect, drain_until, scalar
from tests.test_claim_plan import explain, explain_generic, scans_of

# The file takes over a minute (real workers, ETAs that must come due).
pytestmark = pytest.mark.slow

APP = "tests.apps.delivery_app"


def task_headers(eta: datetime | None = None, **extra: Any) -> dict[str, Any]:
    """Headers of a Celery (protocol 2) task message."""
    headers: dict[str, Any] = {"id": str(uuid.uuid4()), "task": "t.eta", "retries": 0}
    if eta is not None:
        headers["eta"] = eta.isoformat()
    headers.update(extra)
    return headers


def states(db: psycopg.Connection) -> dict[str, int]:
    return dict(db.execute("SELECT state, count(*) FROM pgbroker.message GROUP BY 1").fetchall())


def count_queries(conn: Connection, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    counts: Counter[str] = Counter()
    transport = conn.transport
    for method in ("run", "run_all", "run_count"):
        real = getattr(transport, method)

        def counted(query: str, /, _real: Any = real, **params: Any) -> Any:
            counts[query] += 1
            return _real(query, **params)

        monkeypatch.setattr(transport, method, counted)
    return counts


# --- Kombu: the blocking drain_events path ------------------------------------------


@pytest.mark.parametrize("published", ["before_attach", "after_attach"])
def test_delayed_message_is_delivered_when_due(
    db_url: str, db: psycopg.Connection, published: str
) -> None:
    """Learned at attach or from the publish's NOTIFY: the consumer's timer
    (not the sweep, which is an hour away) delivers the message when due."""
    queue = Queue("eta-q")
    got: list[Message] = []
    with connect(db_url, sweep_interval=3600) as conn, connect(db_url) as producer_conn:
        producer = Producer(producer_conn.default_channel)
        queue(producer_conn.default_channel).declare()
        due = datetime.now(timezone.utc) + timedelta(seconds=1.5)

        def publish() -> None:
            producer.publish("later", routing_key=queue.name, headers=task_headers(due))
            producer.publish("now", routing_key=queue.name, headers=task_headers())

        if published == "before_attach":
            publish()
        with Consumer(conn, [queue], callbacks=[collect(got)]):
            if published == "after_attach":
                publish()
            drain_until(conn, lambda: len(got) == 1)
            assert got[0].payload == "now"
            assert states(db) == {"delayed": 1, "reserved": 1}
            visible = scalar(db, "SELECT visible_at FROM pgbroker.message WHERE state = 'delayed'")
            assert abs((visible - due).total_seconds()) < 0.001
            drain_until(conn, lambda: len(got) == 2, timeout=15)
            late = (datetime.now(timezone.utc) - due).total_seconds()
            print(f"delivered {late:.3f} s after due ({published})")
            assert got[1].payload == "later"
            assert late >= 0
            assert late < 3
            for m in got:
                m.ack()
    assert states(db) == {}


def test_idle_consumer_with_a_delayed_message_sends_only_sweeps(
    db_url: str, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = Queue("eta-idle")
    with connect(db_url, sweep_interval=0.5) as conn:
        due = datetime.now(timezone.utc) + timedelta(hours=1)
        Producer(conn.default_channel).publish(
            "much later", routing_key=queue.name, declare=[queue], headers=task_headers(due)
        )
        with Consumer(conn, [queue], callbacks=[collect([])]):
            counts = count_queries(conn, monkeypatch)
            deadline = time.monotonic() + 2.2
            while (left := deadline - time.monotonic()) > 0:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=left)
            counts = Counter(counts)  # without the cancel's detach
        # The claim made when the consumer started found nothing; since
        # then, only the sweep (every 0.5 s) ran, if this process's sweeper
        # thread (fast_recovery) did not run it instead. No timer fired.
        assert set(counts) <= {"sweep", "claim"}, counts
        assert counts["claim"] <= 1, counts
        assert counts["sweep"] <= 6, counts
    assert states(db) == {"delayed": 1}


def test_past_eta_and_plain_messages_are_ready_at_once(db_url: str, db: psycopg.Connection) -> None:
    queue = Queue("eta-past")
    with connect(db_url) as conn:
        producer = Producer(conn.default_channel)
        past = datetime.now(timezone.utc) - timedelta(seconds=5)
        producer.publish(
            "past", routing_key=queue.name, declare=[queue], headers=task_headers(past)
        )
        # An eta header on a message that is not a Celery task is not ours.
        producer.publish(
            "not a task", routing_key=queue.name, headers={"eta": "2999-01-01T00:00:00"}
        )
        assert states(db) == {"ready": 2}


# --- query plans ------------------------------------------------------------------------


@pytest.fixture
def delayed(db: psycopg.Connection) -> psycopg.Connection:
    """50k delayed rows over five queues and a day, 50k ready rows."""
    from tests.test_claim_plan import QUEUES

    db.execute("INSERT INTO pgbroker.queue (name) SELECT unnest(%s::text[])", [QUEUES])
    db.execute(
        """
        INSERT INTO pgbroker.message (queue, state, visible_at, exchange, routing_key,
                                      headers, properties, body)
        SELECT 'q' || (i % 5), 'delayed', now() + i * interval '1 second', '', '',
               '{}', '{}', '\\x00'
        FROM generate_series(1, 50000) i
        """
    )
    db.execute(
        """
        INSERT INTO pgbroker.message (queue, exchange, routing_key, headers, properties, body)
        SELECT 'q' || (i % 5), '', '', '{}', '{}', '\\x00' FROM generate_series(1, 50000) i
        """
    )
    db.execute("ANALYZE pgbroker.message")
    return db


@pytest.mark.parametrize("how", [explain, explain_generic])
def test_promote_and_next_due_walk_the_delayed_index(delayed: psycopg.Connection, how: Any) -> None:
    params = {"queues": ["q1", "q2"], "limit": 1000, "channel": "pgbroker"}
    plan = how(delayed, "promote", params)
    scans = scans_of(plan, "message")
    assert ("Index Scan", "message_delayed") in scans or (
        "Index Only Scan",
        "message_delayed",
    ) in scans, scans
    assert not [s for s in scans if s[0] in ("Seq Scan", "Bitmap Heap Scan")], scans
    attach = how(delayed, "attach_queue", {"queue": "q1", "consumer_id": 1})
    scans = scans_of(attach, "message")
    assert scans and all(s[1] == "message_delayed" for s in scans), scans


# --- Celery: countdown and far-future ETA, real workers ----------------------------------


def test_countdown_task_waits_in_postgres_and_runs_once_on_time(
    db_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    setup_run_log(db)
    env = celery_env(db_url, TEST_SWEEP_INTERVAL="3600")
    with start_worker(APP, env, tmp_path) as worker, client_app(APP, db_url) as tasks:
        worker.wait_for_log("ready.")
        assert tasks.record.delay("warm-up").get(timeout=30) == "warm-up"
        countdown = 4.0
        sent = time.time()
        result = tasks.record.apply_async(("cd",), countdown=countdown)
        due = sent + countdown
        row = execute(
            db_url,
            "SELECT state, extract(epoch FROM visible_at)::float8 FROM pgbroker.message "
            "WHERE task_id = %s",
            (result.id,),
        )
        assert row and row[0][0] == "delayed", row
        assert abs(row[0][1] - due) < 1.0
        # Not reserved by the worker while it waits: still delayed, no run.
        while time.time() < due - 0.5:
            state = execute(
                db_url, "SELECT state FROM pgbroker.message WHERE task_id = %s", (result.id,)
            )
            assert state == [("delayed",)], state
            assert not runs(db_url, "record", "cd")
            time.sleep(0.2)
        assert result.get(timeout=30) == "cd"
        (_pid, at), *more = runs(db_url, "record", "cd")
        assert not more
        print(f"countdown task ran {at - due:.3f} s after due")
        assert at >= due - 0.05
        assert at - due < 3.0
        # Not held in the worker's ETA schedule longer than that.
        assert "Task delivery_app.record[" in worker.log()
    time.sleep(0.5)  # on purpose: a second run would have happened by now
    assert len(runs(db_url, "record", "cd")) == 1
    assert execute(
        db_url, "SELECT count(*) FROM pgbroker.message WHERE task_id = %s", (result.id,)
    ) == [(0,)]


def test_far_future_task_survives_sigkill_and_runs_once_when_moved_to_now(
    db_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    """A task a day ahead lives in PostgreSQL, not in a worker: a SIGKILL
    loses nothing. Moving it to now (and announcing it, as a publish does)
    wakes an idle worker through NOTIFY; the sweep is an hour away."""
    setup_run_log(db)
    env = celery_env(db_url, TEST_SWEEP_INTERVAL="3600")
    with client_app(APP, db_url) as tasks:
        with start_worker(APP, env, tmp_path, name="w1") as w1:
            w1.wait_for_log("ready.")
            result = tasks.record.apply_async(("tomorrow",), countdown=86400)
            # A task sent after it has run: the worker would have taken it too.
            assert tasks.record.delay("marker").get(timeout=30) == "marker"
            assert execute(
                db_url, "SELECT state FROM pgbroker.message WHERE task_id = %s", (result.id,)
            ) == [("delayed",)]
            w1.kill_group()
            w1.wait_exit(10)
        assert execute(
            db_url, "SELECT state FROM pgbroker.message WHERE task_id = %s", (result.id,)
        ) == [("delayed",)]
        with start_worker(APP, env, tmp_path, name="w2") as w2:
            w2.wait_for_log("ready.")
            assert tasks.record.delay("idle-check").get(timeout=30) == "idle-check"
            time.sleep(1.0)  # on purpose, idle: the startup sweep is long done
            assert not runs(db_url, "record", "tomorrow")
            execute(
                db_url,
                "WITH moved AS (UPDATE pgbroker.message SET visible_at = now() "
                "WHERE task_id = %s RETURNING queue, visible_at) "
                "SELECT pg_notify(%s, extract(epoch FROM visible_at)::text || ' ' || queue) "
                "FROM moved",
                (result.id, due_channel_for("pgbroker")),
            )
            moved = time.time()
            assert result.get(timeout=30) == "tomorrow"
            (_, at), *more = runs(db_url, "record", "tomorrow")
            print(f"moved task ran {at - moved:.3f} s after the move")
            assert not more
            assert at - moved < 3.0
            assert "Task delivery_app.record[" in w2.log()
            time.sleep(0.5)  # on purpose: a second run would have happened by now
            assert len(runs(db_url, "record", "tomorrow")) == 1


def test_waiting_eta_tasks_are_not_in_the_worker(
    db_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    """While they wait, ETA tasks are neither scheduled nor reserved in the
    worker (``celery inspect``); once due, each runs once, at once."""
    setup_run_log(db)
    env = celery_env(db_url, TEST_SWEEP_INTERVAL="3600")
    with start_worker(APP, env, tmp_path) as worker, client_app(APP, db_url) as tasks:
        worker.wait_for_log("ready.")
        due = time.time() + 25.0
        results = [tasks.record.apply_async((f"k{i}",), countdown=25.0) for i in range(5)]
        for what in ("scheduled", "reserved"):
            out = run_celery(APP, ["inspect", what, "--timeout", "3"], env)
            assert out.returncode == 0, out.stdout + out.stderr
            assert "- empty -" in out.stdout, out.stdout
        if time.time() < due - 1:  # (a slow machine may have taken that long)
            delayed = "SELECT count(*) FROM pgbroker.message WHERE state = 'delayed'"
            assert scalar(db, delayed) == 5
        assert [r.get(timeout=60) for r in results] == [f"k{i}" for i in range(5)]
        assert time.time() >= due - 0.1
        time.sleep(0.5)  # on purpose: a second run would have happened by now
        assert all(len(runs(db_url, "record", f"k{i}")) == 1 for i in range(5))


def test_the_sweep_promotes_what_no_timer_knew(db_url: str, db: psycopg.Connection) -> None:
    """The safety net: a delayed row nobody announced (inserted by SQL, no
    NOTIFY) is promoted by the consumer's next sweep."""
    queue = Queue("eta-sweep")
    got: list[Message] = []
    with connect(db_url, sweep_interval=1.0) as conn:
        queue(conn.default_channel).declare()
        with Consumer(conn, [queue], callbacks=[collect(got)]):
            with pytest.raises(TimeoutError):
                conn.drain_events(timeout=0.1)
            db.execute(
                "INSERT INTO pgbroker.message (queue, state, visible_at, exchange, routing_key, "
                "headers, properties, body) VALUES ('eta-sweep', 'delayed', now(), '', "
                "'eta-sweep', '{}', '{}', '\\x00')"
            )
            drain_until(conn, lambda: len(got) == 1, timeout=10)
            got[0].ack()


# --- Celery's expires: never delivered once passed, recorded as REVOKED ---------------------


def test_expired_task_message_is_dead_lettered_and_revoked(
    db_url: str, db: psycopg.Connection
) -> None:
    queue = Queue("exp-q")
    past = datetime.now(timezone.utc) - timedelta(seconds=1)
    expired, done = task_headers(expires=past.isoformat()), task_headers(expires=past.isoformat())
    db.execute(
        "INSERT INTO pgbroker.task_result (task_id, state, result, content_type, "
        "content_encoding) VALUES (%s, 'SUCCESS', '2', 'application/json', 'utf-8')",
        [done["id"]],
    )
    with connect(db_url, sweep_interval=3600) as conn:
        producer = Producer(conn.default_channel)
        producer.publish("late", routing_key=queue.name, declare=[queue], headers=expired)
        producer.publish("already done", routing_key=queue.name, headers=done)
        producer.publish("ttl", routing_key=queue.name, expiration=0.01)
        time.sleep(0.05)  # on purpose: the TTL (10 ms) elapses
        # Claims skip them (before any sweep).
        assert queue(conn.default_channel).get() is None
        assert conn.transport.sweep() == (0, 3, 0)
    assert scalar(db, "SELECT count(*) FROM pgbroker.message") == 0
    # Task messages are kept in dead_letter; the plain TTL message is gone.
    assert sorted(
        db.execute("SELECT reason, task_id FROM pgbroker.dead_letter").fetchall()
    ) == sorted([("expired", expired["id"]), ("expired", done["id"])])
    results: dict[str, tuple[str, str]] = dict(
        db.execute(
            "SELECT task_id, (state, convert_from(result, 'UTF8')) FROM pgbroker.task_result"
        ).fetchall()
    )
    assert results[done["id"]] == ("SUCCESS", "2")
    state, exc = results[expired["id"]]
    assert state == "REVOKED"
    assert '"exc_type" : "TaskRevokedError"' in exc and '["expired"]' in exc


@pytest.mark.parametrize("when", ["past", "while_stopped"])
def test_expired_task_is_never_run_and_ends_revoked(
    db_url: str, db: psycopg.Connection, tmp_path: Path, when: str
) -> None:
    from celery.exceptions import TaskRevokedError

    setup_run_log(db)
    env = celery_env(db_url, TEST_SWEEP_INTERVAL="1")
    with client_app(APP, db_url) as tasks:
        if when == "while_stopped":
            result = tasks.record.apply_async(("late",), expires=1.0)
            time.sleep(1.5)  # on purpose: it expires while no worker runs
        with start_worker(APP, env, tmp_path) as worker:
            worker.wait_for_log("ready.")
            if when == "past":
                past = datetime.now(timezone.utc) - timedelta(seconds=1)
                result = tasks.record.apply_async(("late",), expires=past)
            started = time.monotonic()
            with pytest.raises(TaskRevokedError, match="expired"):
                result.get(timeout=30)
            print(f"get() raised TaskRevokedError after {time.monotonic() - started:.2f} s")
            assert result.state == "REVOKED"
            assert tasks.record.delay("other").get(timeout=30) == "other"
        assert not runs(db_url, "record", "late")
        assert f"Task delivery_app.record[{result.id}] received" not in worker.log()
        assert execute(
            db_url, "SELECT reason FROM pgbroker.dead_letter WHERE task_id = %s", (result.id,)
        ) == [("expired",)]
