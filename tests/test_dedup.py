"""Exactly-once hand-off: a Celery task message that the run of one message
publishes again with the same (task id, retries) and the same routing
stores nothing.

A chain's next link is published by the worker that ran the previous link,
before it stores the result and acknowledges. Killed in between, the
previous link is redelivered (the same message), runs again, and publishes
the next link again; pgbroker stores it only once. The Celery test kills a
real worker at exactly that point. Publications from another message's run
or from outside any task run always go through (tests/test_republish.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import Celery, chain
from celery._state import _task_stack
from kombu import Connection, Consumer, Message, Producer, Queue

from pgbroker.broker.messages import SCHEMA_OID
from pgbroker.operations import admin
from tests.apps.delivery_log import runs, setup_run_log
from tests.celery_helpers import (
    celery_env,
    client_app,
    cut_off,
    execute,
    start_worker,
    wait_until,
)
from tests.kombu_helpers import collect, connect, drain_until, scalar
from tests.test_claim_plan import explain, explain_generic, scans_of
from tests.test_eta import count_queries

APP = "tests.apps.delivery_app"


def task_headers(task_id: str, retries: int = 0) -> dict[str, Any]:
    return {"id": task_id, "task": "t.dedup", "retries": retries}


def stored(db: psycopg.Connection, task_id: str) -> list[tuple[str, int]]:
    rows = db.execute(
        "SELECT queue, (headers->>'retries')::int FROM pgbroker.message "
        "WHERE task_id = %s ORDER BY id",
        [task_id],
    ).fetchall()
    return [(str(q), int(r)) for q, r in rows]


@contextlib.contextmanager
def running(conn: Connection, message_id: int) -> Iterator[None]:
    """As inside a Celery worker's task run of the message ``message_id``
    (delivered by ``conn``'s schema): the task request carries the message's
    properties, as Celery's worker hands them to the run."""
    app = Celery(set_as_current=False)

    @app.task(shared=False)
    def t() -> None: ...

    props = {"delivery_tag": message_id, SCHEMA_OID: conn.transport._lock_oid}
    t.push_request(properties=props, called_directly=False)
    _task_stack.push(t)
    try:
        yield
    finally:
        _task_stack.pop()
        t.pop_request()


def test_same_task_retries_and_source_is_stored_once(
    db_url: str, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    q, other = Queue("dd-a"), Queue("dd-b")
    task_id = str(uuid.uuid4())
    with connect(db_url) as conn, running(conn, 101):
        producer = Producer(conn.default_channel)
        producer.publish("x", routing_key=q.name, declare=[q, other], headers=task_headers(task_id))
        counts = count_queries(conn, monkeypatch)
        with caplog.at_level(logging.INFO, logger="pgbroker"):
            producer.publish("x", routing_key=q.name, headers=task_headers(task_id))
        # Still one statement, one round trip.
        assert counts == {"publish": 1}
        assert "already published" in caplog.text
        assert stored(db, task_id) == [("dd-a", 0)]
        # Celery's retry publishes retries + 1: a new publication.
        producer.publish("x", routing_key=q.name, headers=task_headers(task_id, 1))
        assert stored(db, task_id) == [("dd-a", 0), ("dd-a", 1)]
        # Another routing is a move (celery.contrib.migrate): it goes through,
        # and a repeat of the move is a duplicate again.
        producer.publish("x", routing_key=other.name, headers=task_headers(task_id))
        producer.publish("x", routing_key=other.name, headers=task_headers(task_id))
        assert stored(db, task_id) == [("dd-a", 0), ("dd-a", 1), ("dd-b", 0)]
        # A duplicate that matches no queue is not dead-lettered either.
        producer.publish("x", routing_key=q.name, headers=task_headers(task_id))
        assert scalar(db, "SELECT count(*) FROM pgbroker.dead_letter") == 0
        assert scalar(db, "SELECT count(*) FROM pgbroker.published_task") == 2


def test_other_sources_and_no_source_go_through(db_url: str, db: psycopg.Connection) -> None:
    """The same (task id, retries, routing) from another message's run (a
    replacement of a replacement), from outside any task run (a client, celery
    migrate, a resend), or from a run of another schema's message: stored."""
    q = Queue("dd-src")
    task_id = str(uuid.uuid4())
    with connect(db_url) as conn:
        producer = Producer(conn.default_channel)
        with running(conn, 201):
            producer.publish("x", routing_key=q.name, declare=[q], headers=task_headers(task_id))
        with running(conn, 202):
            producer.publish("x", routing_key=q.name, headers=task_headers(task_id))
        producer.publish("x", routing_key=q.name, headers=task_headers(task_id))
        producer.publish("x", routing_key=q.name, headers=task_headers(task_id))
        with running(conn, 201):
            conn.transport._lock_oid += 1  # as if delivered by another schema
            try:
                producer.publish("x", routing_key=q.name, headers=task_headers(task_id))
            finally:
                conn.transport._lock_oid -= 1
            producer.publish("x", routing_key=q.name, headers=task_headers(task_id))
    assert stored(db, task_id) == [("dd-src", 0)] * 5
    # Only publications of task runs are recorded.
    assert scalar(db, "SELECT count(*) FROM pgbroker.published_task") == 2


def test_copies_of_one_delivered_message_are_stored_once(
    db_url: str, db: psycopg.Connection
) -> None:
    """celery migrate republishes a message with its properties, delivery
    tag included (stable on Redis and pgbroker): a copy made again (a
    migration run again) stores nothing; a copy of another message does."""
    q = Queue("dd-copy")
    task_id = str(uuid.uuid4())
    with connect(db_url) as conn:
        producer = Producer(conn.default_channel)
        for tag in ("tag-1", "tag-1", "tag-2"):
            producer.publish(
                "x",
                routing_key=q.name,
                declare=[q],
                headers=task_headers(task_id),
                delivery_tag=tag,
            )
    assert stored(db, task_id) == [("dd-copy", 0)] * 2
    assert scalar(db, "SELECT array_agg(source ORDER BY source) FROM pgbroker.published_task") == [
        "copy tag-1",
        "copy tag-2",
    ]


def test_delivered_messages_name_their_row(db_url: str, db: psycopg.Connection) -> None:
    """Each delivered message carries its row id (its delivery tag) and the
    schema's oid, which a Celery worker hands to the task run; the oid is not
    stored when a message is published with it."""
    q = Queue("dd-props")
    got: list[Message] = []
    with connect(db_url) as conn:
        producer = Producer(conn.default_channel)
        producer.publish("x", routing_key=q.name, declare=[q])
        row_id = scalar(db, "SELECT id FROM pgbroker.message")
        with Consumer(conn, [q], callbacks=[collect(got)]):
            drain_until(conn, lambda: len(got) == 1)
            props = got[0].properties
            assert props["delivery_tag"] == row_id
            assert props[SCHEMA_OID] == conn.transport._lock_oid
            got[0].ack()
        conn.default_channel.basic_publish(
            conn.default_channel.prepare_message("y", properties={SCHEMA_OID: 2}, headers={}),
            exchange="",
            routing_key=q.name,
        )
    stored_props = scalar(db, "SELECT properties::text FROM pgbroker.message")
    assert SCHEMA_OID not in stored_props


def test_messages_without_task_id_are_never_deduplicated(
    db_url: str, db: psycopg.Connection
) -> None:
    q = Queue("dd-plain")
    with connect(db_url) as conn, running(conn, 301):
        producer = Producer(conn.default_channel)
        for _ in range(3):
            producer.publish("same", routing_key=q.name, declare=[q])
            # An id header alone (no task name) is not a Celery task message.
            producer.publish("same", routing_key=q.name, headers={"id": "fixed"})
        assert scalar(db, "SELECT count(*) FROM pgbroker.message") == 6
        assert scalar(db, "SELECT count(*) FROM pgbroker.published_task") == 0


def test_dedup_window_zero_turns_it_off(db_url: str, db: psycopg.Connection) -> None:
    q = Queue("dd-off")
    task_id = str(uuid.uuid4())
    with connect(db_url, dedup_window=0) as conn, running(conn, 401):
        producer = Producer(conn.default_channel)
        producer.publish("x", routing_key=q.name, declare=[q], headers=task_headers(task_id))
        producer.publish("x", routing_key=q.name, headers=task_headers(task_id))
    assert stored(db, task_id) == [("dd-off", 0), ("dd-off", 0)]


def test_requeue_and_dead_letter_replay_are_not_publications(
    db_url: str, db: psycopg.Connection
) -> None:
    """Kombu's requeue (Celery's Request.reject(requeue=True)) and pgbroker's
    dead-letter replay put the same message back without publishing it."""
    q = Queue("dd-requeue")
    task_id = str(uuid.uuid4())
    got: list[Message] = []
    with connect(db_url) as conn:
        Producer(conn.default_channel).publish(
            "x", routing_key=q.name, declare=[q], headers=task_headers(task_id)
        )
        with Consumer(conn, [q], callbacks=[collect(got)]):
            drain_until(conn, lambda: len(got) == 1)
            got[0].requeue()
            drain_until(conn, lambda: len(got) == 2)
            got[1].reject()
        assert stored(db, task_id) == []
        replayed = admin.replay_dead_letters(db, "pgbroker")
        assert replayed.replayed == 1
        assert stored(db, task_id) == [("dd-requeue", 0)]


def test_sweep_prunes_old_publications_in_batches(db_url: str, db: psycopg.Connection) -> None:
    db.execute(
        "INSERT INTO pgbroker.published_task (task_id, retries, source, exchange, "
        "routing_key, published_at) SELECT 'old' || i, 0, 'run ' || i, '', 'q', "
        "now() - interval '8 days' "
        "FROM generate_series(1, 7000) i"
    )
    db.execute(
        "INSERT INTO pgbroker.published_task (task_id, retries, source, exchange, "
        "routing_key) VALUES ('recent', 0, 'run 1', '', 'q')"
    )
    q = Queue("dd-prune")
    with connect(db_url) as conn, Consumer(conn, [q], callbacks=[collect([])]):
        conn.transport.sweep()
    assert scalar(db, "SELECT count(*) FROM pgbroker.published_task") == 1
    with connect(db_url, dedup_window=3600) as conn, Consumer(conn, [q], callbacks=[collect([])]):
        db.execute(
            "UPDATE pgbroker.published_task SET published_at = now() - %s",
            [timedelta(hours=2)],
        )
        conn.transport.sweep()
    assert scalar(db, "SELECT count(*) FROM pgbroker.published_task") == 0


@pytest.mark.parametrize("how", [explain, explain_generic])
def test_prune_walks_the_published_at_index(db: psycopg.Connection, how: Any) -> None:
    db.execute(
        "INSERT INTO pgbroker.published_task (task_id, retries, source, exchange, "
        "routing_key, published_at) SELECT 't' || i, 0, 'run ' || i, '', 'q', "
        "now() - i * interval '1 minute' "
        "FROM generate_series(1, 50000) i"
    )
    db.execute("ANALYZE pgbroker.published_task")
    plan = how(db, "prune_published", {"window": 7 * 86400.0, "limit": 5000})
    scans = scans_of(plan, "published_task")
    assert ("Index Scan", "published_task_at") in scans, scans
    assert not [s for s in scans if s[0] == "Seq Scan"], scans


# --- Celery: a worker SIGKILLed right after the hand-off ---------------------------------


def test_chain_next_link_runs_once_when_worker_dies_after_hand_off(
    db_url: str, db: psycopg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Results in a schema of their own: the broker cannot finish a task in
    one transaction, so Celery's three commits stand. ``first`` publishes
    ``second``, stores SUCCESS, and its worker is SIGKILLed before
    acknowledging (task_success handler, first delivery only). The
    redelivered ``first`` runs again and publishes ``second`` again: stored
    once (publish deduplication), run once; the chain finishes; and the
    second run of ``first`` does not overwrite its SUCCESS."""
    setup_run_log(db)
    monkeypatch.setenv("TEST_RESULT_SCHEMA", "results_apart")
    env = celery_env(
        db_url,
        TEST_SWEEP_INTERVAL="1",
        TEST_MARKER_DIR=str(tmp_path),
        TEST_RESULT_SCHEMA="results_apart",
    )
    with client_app(APP, db_url) as tasks:
        # The first worker consumes only ``first``'s queue, so ``second``
        # cannot run before the kill.
        with start_worker(APP, env, tmp_path, name="w1", extra=("-Q", "celery")) as w1:
            w1.wait_for_log("ready.")
            result = chain(tasks.first.s("k"), tasks.second.s()).apply_async()
            assert w1.wait_exit(60) == -9
        assert (tmp_path / "killed-after-success").exists()
        first_id = result.parent.id
        assert len(runs(db_url, "first", "k")) == 1
        assert execute(
            db_url,
            "SELECT state, convert_from(result, 'UTF8') FROM results_apart.task_result "
            "WHERE task_id = %s",
            (first_id,),
        ) == [("SUCCESS", '"k run 1"')]
        # ``first`` still held by the dead worker; ``second`` published once.
        assert execute(
            db_url,
            "SELECT queue, state FROM pgbroker.message ORDER BY id",
        ) == [("celery", "reserved"), ("second", "ready")]
        with start_worker(APP, env, tmp_path, name="w2", extra=("-Q", "celery,second")) as w2:
            w2.wait_for_log("ready.")
            assert result.get(timeout=60) == "k run 1 then second"
            wait_until(lambda: len(runs(db_url, "first", "k")) == 2, 30, "first to run again")
            wait_until(
                lambda: not execute(db_url, "SELECT 1 FROM pgbroker.message"),
                30,
                "every message to be acknowledged",
            )
            time.sleep(1.0)  # a duplicate of second would have run by now
        assert len(runs(db_url, "second", "k")) == 1
        # The redelivered first returned "k run 2"; SUCCESS stayed "k run 1".
        assert execute(
            db_url,
            "SELECT state, convert_from(result, 'UTF8') FROM results_apart.task_result "
            "WHERE task_id = %s",
            (first_id,),
        ) == [("SUCCESS", '"k run 1"')]
        assert execute(
            db_url,
            "SELECT reason, task_id FROM pgbroker.redelivery",
        ) == [("consumer died", first_id)]
        assert "already published" in w2.log()


def test_a_finished_task_is_not_run_again_when_its_worker_dies_before_acking(
    db_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    """Broker and results share the schema: ``first``'s result, the next
    link ``second`` and the ack of ``first``'s message commit together
    (pgbroker/broker/finish.py). The worker is SIGKILLed right after
    (task_success handler, before Celery's own ack): ``first``'s message is
    already gone, so nothing is delivered again, ``first`` ran once and
    ``second`` runs once."""
    setup_run_log(db)
    env = celery_env(db_url, TEST_SWEEP_INTERVAL="1", TEST_MARKER_DIR=str(tmp_path))
    with client_app(APP, db_url) as tasks:
        with start_worker(APP, env, tmp_path, name="w1", extra=("-Q", "celery")) as w1:
            w1.wait_for_log("ready.")
            result = chain(tasks.first.s("k"), tasks.second.s()).apply_async()
            assert w1.wait_exit(60) == -9
        assert (tmp_path / "killed-after-success").exists()
        first_id = result.parent.id
        assert execute(
            db_url,
            "SELECT state, convert_from(result, 'UTF8') FROM pgbroker.task_result "
            "WHERE task_id = %s",
            (first_id,),
        ) == [("SUCCESS", '"k run 1"')]
        # ``first``'s message went with its result; ``second`` is there once.
        assert execute(
            db_url,
            "SELECT queue, state FROM pgbroker.message ORDER BY id",
        ) == [("second", "ready")]
        # Exactly once by construction: no published_task row was needed.
        assert execute(db_url, "SELECT task_id FROM pgbroker.published_task") == []
        with start_worker(APP, env, tmp_path, name="w2", extra=("-Q", "celery,second")) as w2:
            w2.wait_for_log("ready.")
            assert result.get(timeout=60) == "k run 1 then second"
            wait_until(
                lambda: not execute(db_url, "SELECT 1 FROM pgbroker.message"),
                30,
                "every message to be acknowledged",
            )
            time.sleep(1.0)  # a redelivered first would have run by now
        assert len(runs(db_url, "first", "k")) == 1
        assert len(runs(db_url, "second", "k")) == 1
        assert execute(db_url, "SELECT reason, task_id FROM pgbroker.redelivery") == []


def test_a_worker_killed_before_the_finish_commits_leaves_nothing_half_done(
    db_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    """The worker is SIGKILLed as ``first``'s finish is about to commit: its
    next link was handed to the transport (held), its result and ack not
    written. Nothing of it is in PostgreSQL: no ``second``, no result, and
    ``first``'s message still held by the dead worker. It is delivered
    again, ``first`` runs again and the chain finishes, ``second`` once."""
    setup_run_log(db)
    env = celery_env(
        db_url, TEST_SWEEP_INTERVAL="1", TEST_MARKER_DIR=str(tmp_path), TEST_KILL_BEFORE_FINISH="1"
    )
    with client_app(APP, db_url) as tasks:
        with start_worker(APP, env, tmp_path, name="w1", extra=("-Q", "celery")) as w1:
            w1.wait_for_log("ready.")
            result = chain(tasks.first.s("k"), tasks.second.s()).apply_async()
            assert w1.wait_exit(60) == -9
        assert (tmp_path / "killed-before-finish").exists()
        first_id = result.parent.id
        assert len(runs(db_url, "first", "k")) == 1
        assert execute(db_url, "SELECT state FROM pgbroker.task_result") == []
        assert execute(db_url, "SELECT queue, state FROM pgbroker.message ORDER BY id") == [
            ("celery", "reserved")
        ]
        with start_worker(APP, env, tmp_path, name="w2", extra=("-Q", "celery,second")) as w2:
            w2.wait_for_log("ready.")
            assert result.get(timeout=60) == "k run 2 then second"
            wait_until(
                lambda: not execute(db_url, "SELECT 1 FROM pgbroker.message"),
                30,
                "every message to be acknowledged",
            )
            time.sleep(1.0)  # a duplicate of second would have run by now
        assert len(runs(db_url, "first", "k")) == 2
        assert len(runs(db_url, "second", "k")) == 1
        assert execute(
            db_url,
            "SELECT state, convert_from(result, 'UTF8') FROM pgbroker.task_result "
            "WHERE task_id = %s",
            (first_id,),
        ) == [("SUCCESS", '"k run 2"')]
        assert execute(db_url, "SELECT reason, task_id FROM pgbroker.redelivery") == [
            ("consumer died", first_id)
        ]


def test_a_task_that_outlives_its_session_finishes_when_nobody_had_its_message_since(
    db_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    """The worker's consumer session is terminated while ``outlive_session``
    runs (acks_late); the sweep puts its message back in its queue, and no
    consumer takes it (the worker stopped consuming that queue). The run
    still holds its message (nobody has had it since), so its finish
    commits: result, next link and ack. (It once rolled back, finding the
    message in its queue, and then the worker's own ack of the run, written
    for the lost session, removed it: the task was lost, with no result and
    no next link. The chaos test found it.)"""
    setup_run_log(db)
    env = celery_env(db_url, TEST_SWEEP_INTERVAL="1")
    with client_app(APP, db_url) as tasks:
        extra = ("-Q", "outlive,second", "--concurrency=1")
        with start_worker(APP, env, tmp_path, name="w1", extra=extra) as w1:
            w1.wait_for_log("ready.")
            result = chain(tasks.outlive_session.s("k"), tasks.second.s()).apply_async()
            wait_until(lambda: runs(db_url, "outlive_session", "k"), 30, "the run to start")
            cut_off(tasks.app, w1, "outlive", db_url)
            assert result.get(timeout=60) == "k run 1 then second"
            wait_until(
                lambda: (
                    not execute(db_url, "SELECT 1 FROM pgbroker.message WHERE task_id IS NOT NULL")
                ),
                30,
                "every task message to be acknowledged",
            )
        assert len(runs(db_url, "outlive_session", "k")) == 1
        assert len(runs(db_url, "second", "k")) == 1
        assert execute(
            db_url,
            "SELECT reason, task_id FROM pgbroker.redelivery",
        ) == [("session lost", result.parent.id)]


@pytest.mark.parametrize("how", [explain, explain_generic])
def test_sweep_and_publish_use_published_task_indexes(db: psycopg.Connection, how: Any) -> None:
    from tests.test_claim_plan import PUBLISH, SWEEP

    db.execute(
        "INSERT INTO pgbroker.published_task (task_id, retries, source, exchange, "
        "routing_key, published_at) SELECT 't' || i, 0, 'run ' || i, '', 'q', "
        "now() - i * interval '1 minute' "
        "FROM generate_series(1, 50000) i"
    )
    db.execute("ANALYZE pgbroker.published_task")
    plans = {
        "sweep": how(db, "sweep", SWEEP),
        **{
            statement: how(
                db,
                statement,
                {**PUBLISH, "dedup": True, "task_id": "t77", "task_name": "x", "source": "run 77"},
            )
            for statement in ("publish", "publish_routing")
        },
    }
    for name, plan in plans.items():
        scans = scans_of(plan, "published_task")
        assert not [s for s in scans if s[0] == "Seq Scan"], (name, scans)
