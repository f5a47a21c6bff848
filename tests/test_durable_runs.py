"""Exclusive runs, fencing, exclusive keys, stored results and durable waits
of DurableTask, in-process against a real PostgreSQL.

Tasks run with ``Task.apply(task_id=...)`` (Celery's tracer, as in a
worker), in threads when two runs must overlap. The worker-process proofs
are in test_durable_waits_worker.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from celery import Celery

from pgbroker.durable import (
    DurableTask,
    EventTimeout,
    prune,
    recorded_steps,
    send_event,
    waiting,
)
from pgbroker.durable.config import close_pools
from pgbroker.errors import DurableWaitError, ExclusiveKeyBusy, LeaseLost
from tests.celery_helpers import wait_until
from tests.pgserver import libpq_url


@pytest.fixture(autouse=True)
def _close_durable_pools() -> Iterator[None]:
    yield
    close_pools()


@pytest.fixture
def app(db_url: str) -> Iterator[Celery]:
    app = Celery("durable_runs", set_as_current=False)
    app.conf.update(broker_url=db_url)
    yield app
    app.close()


def run(task: Any, *args: Any, task_id: str, **kwargs: Any) -> Any:
    return task.apply(args, kwargs, task_id=task_id, throw=True).get()


def in_thread(fn: Any, *args: Any, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def lock_waiters(db: psycopg.Connection) -> int:
    row = db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND wait_event = 'advisory' AND datname = current_database()"
    ).fetchone()
    assert row is not None
    return int(row[0])


# --- one run per task id -------------------------------------------------------------


def test_a_second_run_of_the_same_id_waits_then_replays(
    app: Celery, db: psycopg.Connection
) -> None:
    release = threading.Event()
    started = threading.Event()
    spans: list[tuple[str, float, float]] = []
    calls: list[str] = []

    @app.task(shared=False, bind=True, base=DurableTask)
    def job(self: DurableTask, who: str) -> str:
        begin = time.monotonic()

        def work() -> str:
            calls.append(who)
            return f"done by {who}"

        value = self.step("work", work)
        if who == "first":
            started.set()
            assert release.wait(30)
        spans.append((who, begin, time.monotonic()))
        return str(value)

    first, out1 = in_thread(run, job, "first", task_id="same")
    assert started.wait(30)
    # The run is visible: who runs which task, where, since when.
    row = db.execute(
        "SELECT task_name, backend_pid IS NOT NULL FROM pgbroker.durable_run WHERE task_id = 'same'"
    ).fetchone()
    assert row == (job.name, True)
    second, out2 = in_thread(run, job, "second", task_id="same")
    wait_until(lambda: lock_waiters(db) == 1, 15, "the second run to wait for the task's lock")
    time.sleep(0.3)  # on purpose: it would have started by now, were it not waiting
    assert [s[0] for s in spans] == []  # the second body has not started
    release.set()
    first.join(30)
    second.join(30)
    assert out1 == {"value": "done by first"}
    assert out2 == {"value": "done by first"}  # replayed, not run again
    assert calls == ["first"]
    (_, _, end1), (_, begin2, _) = sorted(spans, key=lambda s: s[1])
    assert begin2 >= end1
    # Both runs are over: no row, no lock.
    assert db.execute("SELECT count(*) FROM pgbroker.durable_run").fetchone() == (0,)
    assert lock_waiters(db) == 0


def test_other_task_ids_run_at_the_same_time(app: Celery) -> None:
    inside = threading.Barrier(2, timeout=30)

    @app.task(shared=False, bind=True, base=DurableTask)
    def job(self: DurableTask) -> str:
        inside.wait()  # both bodies at once, or this times out
        return "ok"

    t1, out1 = in_thread(run, job, task_id="a")
    t2, out2 = in_thread(run, job, task_id="b")
    t1.join(30)
    t2.join(30)
    assert out1 == out2 == {"value": "ok"}


def _lock_session(db: psycopg.Connection, task_id: str) -> int:
    row = db.execute(
        "SELECT backend_pid FROM pgbroker.durable_run WHERE task_id = %s", [task_id]
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_run_whose_lock_session_died_records_no_more_steps(
    app: Celery, db: psycopg.Connection
) -> None:
    calls: list[str] = []

    @app.task(shared=False, bind=True, base=DurableTask)
    def job(self: DurableTask) -> str:
        self.step("one", lambda: calls.append("one"))
        db.execute("SELECT pg_terminate_backend(%s)", [_lock_session(db, self.request.id)])
        self.step("two", lambda: calls.append("two"))
        return "finished"

    with pytest.raises(LeaseLost, match=r"session holding the task's lock was lost"):
        run(job, task_id="t")
    # Step two did not run (its checkpoint lookup failed first), and nothing
    # was recorded for it: the next run runs it, as the owner.
    assert calls == ["one"]
    assert [s.name for s in recorded_steps(db, "t")] == ["one"]


def test_a_conn_step_of_a_run_that_lost_the_task_rolls_back(
    app: Celery, db: psycopg.Connection, db_url: str
) -> None:
    """The lock's session dies and a new run takes the task over while the
    old run is still going: the old run's conn= step (work + checkpoint)
    is refused and rolled back; the new run's goes through."""
    db.execute("CREATE TABLE ledger (entry text)")
    old_started = threading.Event()
    taken_over = threading.Event()
    old_done = threading.Event()

    @app.task(shared=False, bind=True, base=DurableTask)
    def job(self: DurableTask, who: str) -> str:
        if who == "old":
            old_started.set()
            db.execute("SELECT pg_terminate_backend(%s)", [_lock_session(db, self.request.id)])
            assert taken_over.wait(30)
        else:
            taken_over.set()
            assert old_done.wait(30)
        with psycopg.connect(libpq_url(db_url)) as conn:
            self.step(
                "pay",
                lambda: conn.execute("INSERT INTO ledger VALUES (%s)", [who]).rowcount,
                conn=conn,
            )
        return who

    def old_run() -> Any:
        try:
            return run(job, "old", task_id="t")
        finally:
            old_done.set()

    old, out_old = in_thread(old_run)
    # The old run must hold the task first (else the new one would, and the
    # old one would wait for it: no takeover to test).
    assert old_started.wait(30)
    assert run(job, "new", task_id="t") == "new"
    old.join(30)
    assert isinstance(out_old.get("error"), LeaseLost)
    assert db.execute("SELECT entry FROM ledger").fetchall() == [("new",)]
    assert [(s.name, s.state) for s in recorded_steps(db, "t")] == [("pay", "done")]


# --- a stored SUCCESS is final -------------------------------------------------------


def test_a_task_whose_success_is_stored_is_not_run_again(db_url: str) -> None:
    app = Celery("durable_runs_results", set_as_current=False)
    app.conf.update(broker_url=db_url, result_backend=db_url)
    calls: list[int] = []

    @app.task(shared=False, bind=True, base=DurableTask)
    def job(self: DurableTask, n: int) -> int:
        calls.append(n)
        return n * 2

    try:
        app.backend.store_result("done-before", 42, "SUCCESS")
        assert run(job, 1, task_id="done-before") == 42
        assert calls == []
        app.backend.store_result("failed-before", ValueError("x"), "FAILURE")
        assert run(job, 2, task_id="failed-before") == 4
        assert calls == [2]
    finally:
        app.close()


# --- exclusive keys ------------------------------------------------------------------


def test_exclusive_key_modes(app: Celery, db: psycopg.Connection) -> None:
    release = threading.Event()
    holding = threading.Event()

    @app.task(shared=False, bind=True, base=DurableTask, exclusive_key="customer:{customer}")
    def holder(self: DurableTask, customer: int, hold: bool = True) -> str:
        if hold:
            holding.set()
            assert release.wait(30)
        return f"held {customer}"

    @app.task(
        shared=False,
        bind=True,
        base=DurableTask,
        exclusive_key="customer:{customer}",
        on_conflict="skip",
    )
    def skipper(self: DurableTask, customer: int) -> str:
        return "ran"

    @app.task(
        shared=False,
        bind=True,
        base=DurableTask,
        exclusive_key=lambda customer: f"customer:{customer}",
        on_conflict="wait",
        exclusive_timeout=0.5,
    )
    def impatient(self: DurableTask, customer: int) -> str:
        return "ran"

    first, out = in_thread(run, holder, 7, task_id="h1")
    assert holding.wait(30)
    assert run(skipper, 7, task_id="s1") == {
        "skipped": True,
        "exclusive_key": "customer:7",
        "held_by": "h1",
    }
    assert run(skipper, 8, task_id="s2") == "ran"  # another key
    with pytest.raises(ExclusiveKeyBusy, match=r"customer:7.*held by task h1.*0.5 s"):
        run(impatient, 7, task_id="i1")
    # "wait" without a timeout: runs once the holder is done.
    waiter, out2 = in_thread(run, holder, 7, False, task_id="h2")
    wait_until(lambda: lock_waiters(db) == 1, 15, "the second holder to wait for the key")
    release.set()
    first.join(30)
    waiter.join(30)
    assert out == {"value": "held 7"} and out2 == {"value": "held 7"}


def test_exclusive_key_naming_a_missing_argument_is_a_clear_error(app: Celery) -> None:
    @app.task(shared=False, bind=True, base=DurableTask, exclusive_key="customer:{customer_id}")
    def job(self: DurableTask, customer: int) -> None:
        pass

    with pytest.raises(Exception, match=r"exclusive_key .* names 'customer_id'.*customer"):
        run(job, 1, task_id="x")


# --- durable waits -------------------------------------------------------------------


def test_an_event_sent_before_the_wait_returns_at_once(
    app: Celery, db: psycopg.Connection, db_url: str
) -> None:
    calls: list[str] = []

    @app.task(shared=False, bind=True, base=DurableTask)
    def flow(self: DurableTask) -> Any:
        self.step("prepare", lambda: calls.append("prepare"))
        answer = self.wait_for_event("approval:1", timeout=3600)

        def finish() -> str:
            calls.append("finish")
            return "finished"

        return [answer, self.step("finish", finish)]

    sent = send_event(app, "approval:1", {"approved": True, "by": "ann"})
    assert sent.recorded and sent.waiting == 0 and sent.woken == []
    # The first payload is kept.
    assert not send_event(db_url, "approval:1", {"approved": False}).recorded
    assert run(flow, task_id="f") == [{"approved": True, "by": "ann"}, "finished"]
    assert [(s.name, s.output) for s in recorded_steps(db, "f")] == [
        ("prepare", None),
        ("event:approval:1", {"payload": {"approved": True, "by": "ann"}}),
        ("finish", "finished"),
    ]
    assert waiting(db) == []
    assert calls == ["prepare", "finish"]


def test_a_timed_out_wait_raises_event_timeout_on_every_replay(
    app: Celery, db: psycopg.Connection
) -> None:
    @app.task(shared=False, bind=True, base=DurableTask)
    def flow(self: DurableTask) -> str:
        try:
            self.wait_for_event("never", timeout=0)
        except EventTimeout as exc:
            return f"timed out: {exc}"
        return "got it"

    assert run(flow, task_id="t").startswith("timed out: task")
    # Even once the event exists, the recorded outcome stays a timeout.
    send_event(app, "never", 1)
    assert "no event 'never' within the timeout" in run(flow, task_id="t")


def test_waits_cannot_park_outside_a_worker(app: Celery, db: psycopg.Connection) -> None:
    @app.task(shared=False, bind=True, base=DurableTask)
    def flow(self: DurableTask) -> Any:
        return self.wait_for_event("later", timeout=60)

    with pytest.raises(DurableWaitError, match="eager task"):
        run(flow, task_id="e")
    # The wait is recorded, with its deadline.
    (wait,) = waiting(db)
    assert (wait.task_id, wait.kind, wait.name) == ("e", "event", "later")
    assert wait.deadline is not None and wait.since < wait.deadline
    with pytest.raises(DurableWaitError, match="direct call"):
        flow()


def test_send_event_wakes_a_parked_message(
    app: Celery, db: psycopg.Connection, db_url: str
) -> None:
    """The delayed message of a waiting task becomes ready, its eta header
    is cleared (Celery would hold it until then) and its queue NOTIFYed,
    all when send_event commits."""
    db.execute(
        "INSERT INTO pgbroker.durable_wait (task_id, step_index, kind, name) "
        "VALUES ('w1', 0, 'event', 'go'), ('w2', 3, 'event', 'go'), ('w3', 0, 'event', 'other')"
    )
    for task_id, headers in [
        ("w1", '{"id": "w1", "eta": "2999-01-01T00:00:00+00:00", "retries": 1}'),
        # A header holding U+0000 cannot go through jsonb.
        ("w2", '{"id": "w2", "argsrepr": "(\'a\\u0000b\',)", "eta": "2999-01-01T00:00:00"}'),
        ("w3", '{"id": "w3", "eta": "2999-01-01T00:00:00+00:00"}'),
    ]:
        db.execute(
            "INSERT INTO pgbroker.message (queue, state, visible_at, exchange, routing_key, "
            "task_id, headers, properties, body) VALUES ('q', 'delayed', "
            "'2999-01-01', '', 'q', %s, %s::json, '{}', '')",
            [task_id, headers],
        )
    with psycopg.connect(libpq_url(db_url), autocommit=True) as listener:
        listener.execute("LISTEN pgbroker")
        sent = send_event(app, "go", "payload")
        notes = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
    assert sent.waiting == 2 and sorted(sent.woken) == ["w1", "w2"]
    assert notes == ["q"]
    rows = db.execute(
        "SELECT task_id, state, visible_at, headers::text FROM pgbroker.message ORDER BY task_id"
    ).fetchall()
    assert [(r[0], r[1], r[2] is None) for r in rows] == [
        ("w1", "ready", True),
        ("w2", "ready", True),
        ("w3", "delayed", False),
    ]
    assert '"eta": null' in rows[0][3] and '"eta": null' in rows[1][3]
    assert "\\u0000" in rows[1][3]
    assert db.execute(
        "SELECT count(*) FROM pgbroker.durable_wait WHERE woken_at IS NOT NULL"
    ).fetchone() == (2,)


def test_waking_uses_the_delayed_task_index(db: psycopg.Connection) -> None:
    db.execute("SET enable_seqscan = off")
    plan = "\n".join(
        r[0]
        for r in db.execute(
            "EXPLAIN SELECT 1 FROM pgbroker.message WHERE state = 'delayed' AND task_id = 'x'"
        ).fetchall()
    )
    assert "message_delayed_task" in plan


def test_prune_removes_old_events_waits_and_dead_runs(
    app: Celery, db: psycopg.Connection, db_url: str
) -> None:
    send_event(app, "old", 1)
    db.execute(
        "INSERT INTO pgbroker.durable_wait (task_id, step_index, kind, name, deadline) "
        "VALUES ('gone', 0, 'event', 'x', now() - interval '1 hour'), "
        "('alive', 0, 'event', 'y', now() + interval '1 hour')"
    )
    db.execute(
        "INSERT INTO pgbroker.durable_run (task_id, run_id, backend_pid) VALUES "
        "('dead', gen_random_uuid(), 0), ('live', gen_random_uuid(), pg_backend_pid())"
    )
    time.sleep(0.05)  # on purpose: what was written is older than the keep time (0)
    assert prune(db_url, 0) == 3
    assert db.execute("SELECT count(*) FROM pgbroker.durable_event").fetchone() == (0,)
    assert [w.task_id for w in waiting(db)] == ["alive"]
    assert db.execute("SELECT task_id FROM pgbroker.durable_run").fetchall() == [("live",)]


# --- every task of an app: task_cls -----------------------------------------------------


def test_task_cls_makes_every_task_of_an_app_exclusive_per_task_id(db_url: str) -> None:
    """``Celery(task_cls="pgbroker.durable:DurableTask")``: plain tasks, with
    no steps and no bind, get one run per task id at a time too."""
    app = Celery("durable_all", set_as_current=False, task_cls="pgbroker.durable:DurableTask")
    app.conf.update(broker_url=db_url)
    spans: list[tuple[str, float, float]] = []
    first_started = threading.Event()

    @app.task(shared=False)
    def plain(who: str) -> str:
        start = time.monotonic()
        if who == "first":
            first_started.set()
            time.sleep(1.0)
        spans.append((who, start, time.monotonic()))
        return who

    try:
        assert isinstance(plain, DurableTask)
        first, out = in_thread(run, plain, "first", task_id="same")
        assert first_started.wait(30)
        assert run(plain, "second", task_id="same") == "second"  # waited for "first"
        first.join(30)
        assert out.get("value") == "first"
        (a, _, a_end), (b, b_start, _) = sorted(spans, key=lambda s: s[1])
        assert (a, b) == ("first", "second")
        assert b_start >= a_end  # never at once
        # Other task ids are not held up.
        assert run(plain, "other", task_id="another") == "other"
    finally:
        app.close()
