"""Durable steps in real ``celery worker`` processes, killed with SIGKILL.

The task's step bodies record their side effects in the ``effect`` table,
so the test counts how many times each ran, across workers.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psycopg

from tests.celery_helpers import celery_env, client_app, execute, start_worker, wait_until

APP = "tests.apps.durable_app"
RESULT_TIMEOUT = 60


def setup_tables(db: psycopg.Connection) -> None:
    db.execute("CREATE TABLE effect (id serial, key text, step text, pid int)")
    db.execute("CREATE TABLE run (id serial, key text, pid int)")


def effects(db_url: str, key: str) -> dict[str, list[int]]:
    """Step name -> pids of the processes that ran its body, in order."""
    found: dict[str, list[int]] = {}
    for step, pid in execute(
        db_url, "SELECT step, pid FROM effect WHERE key = %s ORDER BY id", (key,)
    ):
        found.setdefault(step, []).append(pid)
    return found


def runs(db_url: str, key: str) -> list[int]:
    return [r[0] for r in execute(db_url, "SELECT pid FROM run WHERE key = %s ORDER BY id", (key,))]


def test_sigkilled_worker_resumes_after_the_last_completed_step(
    db_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    """The worker (and its pool) is SIGKILLed after step 2 committed; a new
    worker runs the task again: steps 1 and 2 replay, step 3 runs."""
    setup_tables(db)
    env = celery_env(db_url)
    pause = tmp_path / "step2-done"
    with client_app(APP, db_url) as tasks:
        with start_worker(APP, env, tmp_path, "a") as a:
            a.wait_for_log("ready.")
            result = tasks.onboard.delay("k1", str(pause))
            wait_until(pause.exists, 30, "the task to finish step 2")
            first_pid = int(pause.read_text())
            assert effects(db_url, "k1") == {
                "create_account": [first_pid],
                "charge": [first_pid],
            }
            a.kill_group()
            a.wait_exit(timeout=10)
            wait_until(lambda: not a.group_pids(), 10, "worker a's processes to die")
        assert not result.ready()

        with start_worker(APP, env, tmp_path, "b") as b:
            b.wait_for_log("ready.")
            value = result.get(timeout=RESULT_TIMEOUT)
            assert value["account"] == "acct-k1"
            assert value["charge"] == "charge-acct-k1"
            assert value["mail"] == "welcome sent to acct-k1"
            second_pid = value["pid"]
            assert second_pid != first_pid and second_pid in b.group_pids()
            # Each body ran exactly once; the task itself ran twice.
            assert effects(db_url, "k1") == {
                "create_account": [first_pid],
                "charge": [first_pid],
                "welcome_email": [second_pid],
            }
            assert runs(db_url, "k1") == [first_pid, second_pid]
            log = b.log()
            assert "step 0 ('create_account') replayed from its checkpoint" in log
            assert "step 1 ('charge') replayed from its checkpoint" in log
    rows = execute(
        db_url,
        "SELECT step_index, name, state, attempts, expires_at IS NOT NULL "
        "FROM pgbroker.durable_step WHERE task_id = %s ORDER BY step_index",
        (result.id,),
    )
    assert rows == [
        (0, "create_account", "done", 1, True),
        (1, "charge", "done", 1, True),
        (2, "welcome_email", "done", 1, True),
    ]


def test_killed_pool_process_and_celery_retry_resume_in_one_worker(
    db_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    """The OOM-killer case (only the pool process dies; with
    task_reject_on_worker_lost the task goes back to the queue) and a retry
    asked by the task (self.retry): both replay the completed steps."""
    setup_tables(db)
    env = celery_env(db_url)
    pause = tmp_path / "step2-done"
    with client_app(APP, db_url) as tasks, start_worker(APP, env, tmp_path, "w") as w:
        w.wait_for_log("ready.")
        result = tasks.onboard.delay("k2", str(pause))
        wait_until(pause.exists, 30, "the task to finish step 2")
        child = int(pause.read_text())
        assert child != w.pid and child in w.group_pids()
        os.kill(child, signal.SIGKILL)
        value = result.get(timeout=RESULT_TIMEOUT)
        assert value["pid"] != child
        assert effects(db_url, "k2") == {
            "create_account": [child],
            "charge": [child],
            "welcome_email": [value["pid"]],
        }
        assert runs(db_url, "k2") == [child, value["pid"]]

        retried = tasks.retried.delay("k3")
        assert retried.get(timeout=RESULT_TIMEOUT) == "welcome sent to acct-k3 after 1 retry"
        assert {step: len(pids) for step, pids in effects(db_url, "k3").items()} == {
            "create_account": 1,
            "welcome_email": 1,
        }
        # durable_keep=0: its steps are deleted once it succeeded (just after
        # the result is sent).
        wait_until(
            lambda: (
                not execute(
                    db_url, "SELECT 1 FROM pgbroker.durable_step WHERE task_id = %s", (retried.id,)
                )
            ),
            10,
            "the succeeded task's steps to be deleted",
        )
