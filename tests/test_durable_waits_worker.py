"""Exclusive runs, exclusive keys, durable waits and the stored-result check
of DurableTask, with real ``celery worker`` processes (tests/apps/
durable_waits_app.py), sessions terminated and workers SIGKILLed.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgbroker.durable import send_event
from tests.celery_helpers import (
    celery_env,
    client_app,
    cut_off,
    execute,
    start_worker,
    wait_until,
)

APP = "tests.apps.durable_waits_app"
RESULT_TIMEOUT = 60


@pytest.fixture(autouse=True)
def tables(db: psycopg.Connection) -> None:
    db.execute(
        "CREATE TABLE span (id serial, key text, pid int, started timestamptz, ended timestamptz)"
    )
    db.execute("CREATE TABLE effect (id serial, key text, step text, pid int)")


def spans(db_url: str, prefix: str) -> list[tuple[str, int, Any, Any]]:
    return [
        (r[0], r[1], r[2], r[3])
        for r in execute(
            db_url,
            "SELECT key, pid, started, ended FROM span WHERE key LIKE %s ORDER BY started",
            (prefix + "%",),
        )
    ]


def effects(db_url: str, key: str) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for step, pid in execute(
        db_url, "SELECT step, pid FROM effect WHERE key = %s ORDER BY id", (key,)
    ):
        found.setdefault(step, []).append(pid)
    return found


def assert_no_overlap(rows: list[tuple[str, int, Any, Any]]) -> None:
    for earlier, later in itertools.pairwise(rows):
        assert earlier[3] is not None, f"{earlier} never ended"
        assert later[2] >= earlier[3], f"{later} started before {earlier} ended"


def parked(db_url: str, task_id: str) -> bool:
    return bool(
        execute(db_url, "SELECT 1 FROM pgbroker.durable_wait WHERE task_id = %s", (task_id,))
    )


# --- one run per task id, across a takeover ------------------------------------------


def test_a_taken_over_task_never_runs_on_two_workers_at_once(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first worker's broker session is terminated while the body runs:
    the broker hands the message to the second worker, whose run waits for
    the first one's to end, then replays its steps."""
    monkeypatch.setenv("TEST_RESULTS", "rpc")  # so that the second run runs the body
    env = celery_env(db_url, TEST_RESULTS="rpc")
    pause, release = tmp_path / "paused", tmp_path / "release"
    with (
        client_app(APP, db_url) as tasks,
        start_worker(APP, env, tmp_path, "a", ("--concurrency=1",)) as a,
        start_worker(APP, env, tmp_path, "b", ("--concurrency=1",)) as b,
    ):
        a.wait_for_log("ready.")
        b.wait_for_log("ready.")
        result = tasks.long_job.delay("job", str(pause), str(release))
        wait_until(pause.exists, 30, "the first run to finish step one")
        first_pid = int(pause.read_text())
        first, second = (a, b) if first_pid in a.group_pids() else (b, a)
        assert first_pid in first.group_pids()
        # The first worker stops taking messages from the queue (so that the
        # redelivery goes to the other one), then loses its broker sessions.
        cut_off(tasks.app, first, "celery", db_url)
        second.wait_for_log("is already running", timeout=30)
        assert len(spans(db_url, "job")) == 1  # the second body has not started
        release.touch()
        result.get(timeout=RESULT_TIMEOUT)
        wait_until(
            lambda: len(spans(db_url, "job")) == 2 and all(s[3] for s in spans(db_url, "job")),
            RESULT_TIMEOUT,
            "the second run to end",
        )
        rows = spans(db_url, "job")
        assert [r[1] for r in rows] == [first_pid, rows[1][1]]
        assert rows[1][1] in second.group_pids()
        assert_no_overlap(rows)
        # Each step body ran once, in the first run; the second replayed both.
        assert effects(db_url, "job") == {"one": [first_pid], "two": [first_pid]}
        log = second.log()
        assert "step 0 ('one') replayed from its checkpoint" in log
        assert "step 1 ('two') replayed from its checkpoint" in log


def test_a_run_whose_lock_session_is_lost_gives_its_message_back(
    db_url: str, tmp_path: Path
) -> None:
    """The session holding the task's lock is terminated mid-body: the run's
    next checkpoint raises LeaseLost instead of recording, the message goes
    back to the queue (acks_late), and the next run replays step one and
    runs step two."""
    env = celery_env(db_url)
    pause, release = tmp_path / "paused", tmp_path / "release"
    with (
        client_app(APP, db_url) as tasks,
        start_worker(APP, env, tmp_path, "w", ("--concurrency=1",)) as w,
    ):
        w.wait_for_log("ready.")
        result = tasks.long_job.delay("lost", str(pause), str(release))
        wait_until(pause.exists, 30, "the first run to finish step one")
        first_pid = int(pause.read_text())
        killed = execute(
            db_url,
            "SELECT pg_terminate_backend(backend_pid) FROM pgbroker.durable_run WHERE task_id = %s",
            (result.id,),
        )
        assert killed == [(True,)]
        release.touch()
        value = result.get(timeout=RESULT_TIMEOUT)
        assert effects(db_url, "lost") == {"one": [first_pid], "two": [value["pid"]]}
        log = w.log()
        assert "the database session holding the task's lock was lost" in log
        assert "step 0 ('one') replayed from its checkpoint" in log


# --- exclusive keys ------------------------------------------------------------------


def test_exclusive_key_wait_skip_and_retry(db_url: str, tmp_path: Path) -> None:
    env = celery_env(db_url)
    with client_app(APP, db_url) as tasks, start_worker(APP, env, tmp_path, "w") as w:
        w.wait_for_log("ready.")

        def started(release: Path, tag: str) -> bool:
            return Path(f"{release}.{tag}.started").exists()

        # wait: the second run blocks until the first is done, then runs.
        release = tmp_path / "release-wait"
        first = tasks.wait_for_key.delay(1, "a", str(release))
        wait_until(lambda: started(release, "a"), 30, "the first holder to start")
        second = tasks.wait_for_key.delay(1, "b", str(release))
        w.wait_for_log(f"is held by task {first.id}: waiting for it", timeout=30)
        assert not started(release, "b")
        release.touch()
        assert first.get(timeout=RESULT_TIMEOUT) == "a done"
        assert second.get(timeout=RESULT_TIMEOUT) == "b done"
        assert_no_overlap(spans(db_url, "customer:1:"))

        # skip: the second run returns at once, saying so.
        release = tmp_path / "release-skip"
        first = tasks.skip_on_key.delay(2, "a", str(release))
        wait_until(lambda: started(release, "a"), 30, "the first holder to start")
        skipped = tasks.skip_on_key.delay(2, "b", str(release))
        assert skipped.get(timeout=RESULT_TIMEOUT) == {
            "skipped": True,
            "exclusive_key": "customer:2",
            "held_by": first.id,
        }
        release.touch()
        assert first.get(timeout=RESULT_TIMEOUT) == "a done"
        assert not started(release, "b")

        # retry: the second run retries (countdown 0.5 s) until the key is free.
        release = tmp_path / "release-retry"
        first = tasks.retry_on_key.delay(3, "a", str(release))
        wait_until(lambda: started(release, "a"), 30, "the first holder to start")
        second = tasks.retry_on_key.delay(3, "b", str(release))
        wait_until(
            lambda: w.log().count(f"retry_on_key[{second.id}] retry") >= 2,
            30,
            "the second run to retry twice",
        )
        release.touch()
        assert first.get(timeout=RESULT_TIMEOUT) == "a done"
        assert second.get(timeout=RESULT_TIMEOUT) == "b done"
        assert_no_overlap(spans(db_url, "customer:3:"))


# --- durable waits -------------------------------------------------------------------


def test_a_waiting_task_frees_its_worker_and_resumes_on_the_event(
    db_url: str, tmp_path: Path
) -> None:
    env = celery_env(db_url)
    with (
        client_app(APP, db_url) as tasks,
        start_worker(APP, env, tmp_path, "w", ("--concurrency=1",)) as w,
    ):
        w.wait_for_log("ready.")
        flow = tasks.approval_flow.delay(42)
        wait_until(lambda: parked(db_url, flow.id), 30, "the flow to wait for its event")
        w.wait_for_log(f"approval_flow[{flow.id}]: waiting for event 'approval:42'")
        # The only worker slot is free meanwhile.
        assert tasks.quick.delay(1).get(timeout=RESULT_TIMEOUT) == 2
        (wait,) = execute(
            db_url,
            "SELECT kind, name, deadline > now() + interval '50 minutes' "
            "FROM pgbroker.durable_wait",
        )
        assert wait == ("event", "approval:42", True)

        started = time.monotonic()
        sent = send_event(tasks.app, "approval:42", {"approved": True, "by": "ann"})
        value = flow.get(timeout=RESULT_TIMEOUT)
        resumed = time.monotonic() - started
        print(f"send_event to result: {resumed * 1000:.0f} ms")
        assert sent.woken == [flow.id]
        assert value["answer"] == {"approved": True, "by": "ann"}
        assert effects(db_url, "order:42") == {
            "prepare": [value["pid"]],
            "finish": [value["pid"]],
        }
        assert "step 0 ('prepare') replayed from its checkpoint" in w.log()
        assert not parked(db_url, flow.id)
        assert resumed < 15, f"resumed {resumed:.1f} s after the event"

        # An event sent before the wait: no parking at all.
        send_event(tasks.app, "approval:7", "yes")
        early = tasks.approval_flow.delay(7)
        assert early.get(timeout=RESULT_TIMEOUT)["answer"] == "yes"
        assert f"approval_flow[{early.id}]: waiting" not in w.log()

        # A timeout: EventTimeout, caught by the task.
        late = tasks.approval_flow.delay(8, timeout=1)
        assert late.get(timeout=RESULT_TIMEOUT)["answer"] == "timed out"
        assert effects(db_url, "order:8") == {"prepare": [value["pid"]], "finish": [value["pid"]]}

        # Durable sleeps park too, and parks are not retries: with
        # max_retries=1, two parks and one retry of its own still succeed.
        nap = tasks.napper.delay("nap", str(tmp_path / "retried"))
        assert nap.get(timeout=RESULT_TIMEOUT) == {"retries": 3, "parks": 2}
        assert {k: len(v) for k, v in effects(db_url, "nap").items()} == {
            "before": 1,
            "after": 1,
        }


def test_a_parked_task_survives_the_sigkill_of_its_worker(db_url: str, tmp_path: Path) -> None:
    env = celery_env(db_url)
    with client_app(APP, db_url) as tasks:
        with start_worker(APP, env, tmp_path, "a", ("--concurrency=1",)) as a:
            a.wait_for_log("ready.")
            flow = tasks.approval_flow.delay(43)
            wait_until(lambda: parked(db_url, flow.id), 30, "the flow to wait for its event")
            a.wait_for_log(f"approval_flow[{flow.id}]: waiting for event 'approval:43'")
            wait_until(
                lambda: (
                    not execute(
                        db_url,
                        "SELECT 1 FROM pgbroker.message WHERE task_id = %s AND state = 'reserved'",
                        (flow.id,),
                    )
                ),
                10,
                "the original message's ack",
            )
            a.kill_group()
            a.wait_exit(timeout=10)
            wait_until(lambda: not a.group_pids(), 10, "worker a's processes to die")
        with start_worker(APP, env, tmp_path, "b", ("--concurrency=1",)) as b:
            b.wait_for_log("ready.")
            send_event(tasks.app, "approval:43", "approved after a crash")
            value = flow.get(timeout=RESULT_TIMEOUT)
            assert value["answer"] == "approved after a crash"
            assert value["pid"] in b.group_pids()
            assert [len(v) for v in effects(db_url, "order:43").values()] == [1, 1]


# --- a stored SUCCESS is final -------------------------------------------------------


def test_a_task_redelivered_after_its_success_was_stored_is_not_run_again(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Results in a schema of their own, so the result and the ack do not
    commit together: the worker is SIGKILLed by a task_success handler, the
    result stored, the message not acked; it is delivered again to another
    worker and returns the stored result without running the body."""
    monkeypatch.setenv("TEST_RESULTS", "apart")
    env = celery_env(db_url, TEST_RESULTS="apart")
    marker = tmp_path / "killed-once"
    with client_app(APP, db_url) as tasks:
        with start_worker(APP, env, tmp_path, "a", ("--concurrency=1",)) as a:
            a.wait_for_log("ready.")
            result = tasks.succeed_then_die.apply_async(
                kwargs={"key": "once", "marker": str(marker)}
            )
            assert result.get(timeout=RESULT_TIMEOUT) == "result of once"
            a.wait_exit(timeout=30)
            wait_until(lambda: not a.group_pids(), 10, "worker a's processes to die")
        assert marker.exists()
        with start_worker(APP, env, tmp_path, "b", ("--concurrency=1",)) as b:
            b.wait_for_log(f"succeed_then_die[{result.id}] already succeeded", timeout=60)
            wait_until(
                lambda: (
                    not execute(
                        db_url, "SELECT 1 FROM pgbroker.message WHERE task_id = %s", (result.id,)
                    )
                ),
                30,
                "the redelivered message to be acked",
            )
            assert result.get(timeout=RESULT_TIMEOUT) == "result of once"
            assert len(spans(db_url, "once")) == 1  # the body ran once


def test_a_task_whose_success_was_stored_is_not_delivered_again(
    db_url: str, tmp_path: Path
) -> None:
    """Results in the broker's schema: the result and the ack commit
    together, so the worker SIGKILLed by a task_success handler (result
    stored, Celery's ack not sent) leaves no message behind: nothing is
    delivered again, and the body ran once."""
    env = celery_env(db_url)
    marker = tmp_path / "killed-once"
    with client_app(APP, db_url) as tasks:
        with start_worker(APP, env, tmp_path, "a", ("--concurrency=1",)) as a:
            a.wait_for_log("ready.")
            result = tasks.succeed_then_die.apply_async(
                kwargs={"key": "once", "marker": str(marker)}
            )
            assert result.get(timeout=RESULT_TIMEOUT) == "result of once"
            a.wait_exit(timeout=30)
            wait_until(lambda: not a.group_pids(), 10, "worker a's processes to die")
        assert marker.exists()
        assert (
            execute(db_url, "SELECT 1 FROM pgbroker.message WHERE task_id = %s", (result.id,)) == []
        )
        assert execute(db_url, "SELECT reason FROM pgbroker.redelivery") == []
        assert len(spans(db_url, "once")) == 1  # the body ran once


def test_a_second_delivery_of_a_finished_task_hands_off_nothing_again(
    db_url: str, tmp_path: Path
) -> None:
    """Two messages of one task id (as after a failover: the original,
    redelivered because its ack was lost with the primary, and the task's
    own retry): the first to run stores SUCCESS and hands the chain's next
    link off; the second finds the stored SUCCESS and is acknowledged
    (Celery's Ignore) without storing, handing off or counting anything
    again. Found by tests/test_ha_failover.py: five chain links handed off
    twice."""
    env = celery_env(db_url)
    first, following = "twice-first", "twice-next"
    with client_app(APP, db_url) as tasks:

        def send() -> Any:
            return (
                tasks.succeed_then_die.si(key="twice", marker="").set(task_id=first)
                | tasks.quick.si(1).set(task_id=following)
            ).apply_async()

        with start_worker(APP, env, tmp_path, "a", ("--concurrency=1",)) as worker:
            worker.wait_for_log("ready.")
            assert send().get(timeout=RESULT_TIMEOUT) == 2
            send()  # the same task ids again: the second delivery of `first`
            worker.wait_for_log(f"succeed_then_die[{first}] already succeeded", timeout=60)
            wait_until(
                lambda: execute(db_url, "SELECT count(*) FROM pgbroker.message") == [(0,)],
                30,
                "the queue to be empty",
            )
            time.sleep(0.5)  # a hand-off would have been delivered by now
            assert worker.log().count(f"quick[{following}] received") == 1, worker.log()
            assert f"succeed_then_die[{first}] ignored" in worker.log()
        assert tasks.app.AsyncResult(first).get(timeout=RESULT_TIMEOUT) == "result of twice"
        assert len(spans(db_url, "twice")) == 1  # the body ran once


def test_two_messages_of_one_task_id_running_at_once_hand_off_once(
    db_url: str, tmp_path: Path
) -> None:
    """Two messages of one task id run at once (a client's publish stored
    twice, as when its commit's reply was lost in a failover and Kombu sent
    it again; found under Patroni, docs/high-availability.md): the second
    run waits for the first one's lock. It must not get the lock before the
    first run's SUCCESS is stored and its next link handed off: it would
    find no SUCCESS, replay the steps, and hand the next link off again."""
    env = celery_env(db_url)
    first, following = "both-first", "both-next"
    pause, release = tmp_path / "paused", tmp_path / "release"
    with client_app(APP, db_url) as tasks:

        def send() -> Any:
            return (
                tasks.long_job.si("both", str(pause), str(release)).set(task_id=first)
                | tasks.quick.si(1).set(task_id=following)
            ).apply_async()

        with start_worker(APP, env, tmp_path, "a", ("--concurrency=2",)) as worker:
            worker.wait_for_log("ready.")
            result = send()
            wait_until(pause.exists, 30, "the first run to finish step one")
            send()  # the same task ids again, while the first run holds the lock
            worker.wait_for_log(f"long_job[{first}] is already running", timeout=30)
            release.touch()
            assert result.get(timeout=RESULT_TIMEOUT) == 2
            worker.wait_for_log(f"long_job[{first}] already succeeded", timeout=60)
            wait_until(
                lambda: execute(db_url, "SELECT count(*) FROM pgbroker.message") == [(0,)],
                30,
                "the queue to be empty",
            )
            time.sleep(0.5)  # a second hand-off would have been delivered by now
            assert worker.log().count(f"quick[{following}] received") == 1, worker.log()
        assert len(spans(db_url, "both")) == 1  # the body ran once
