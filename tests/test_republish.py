"""Publishing a task id again goes through whenever it is not the
redelivered run of one message publishing the same task again
(tests/test_dedup.py): Task.replace, a replacement of a replacement,
Task.retry with a countdown, an explicit task_id reused after forget(),
and a revoked task resent with its id. With a real prefork worker.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from tests.celery_helpers import celery_env, client_app, execute, start_worker, wait_until

APP = "tests.apps.republish_app"


def test_replace_retry_and_reuse_with_a_worker(db_url: str, tmp_path: Path) -> None:
    env = celery_env(db_url)
    with client_app(APP, db_url) as tasks, start_worker(APP, env, tmp_path) as worker:
        worker.wait_for_log("ready.")
        # Task.replace: the replacement keeps the task id, retries 0.
        assert tasks.replaced.delay(1).get(timeout=30) == 2
        # A replacement replaced in turn.
        assert tasks.replaced_twice.delay(5).get(timeout=30) == 6
        # Task.retry with a countdown, twice.
        assert tasks.retrying.delay(2).get(timeout=30) == 2
        # A retried task replaced by one that retries: (id, retries 1) again.
        assert tasks.retry_then_replace.delay().get(timeout=30) == 1
        # An explicit task_id used again after forget().
        fixed = str(uuid.uuid4())
        first = tasks.add.apply_async((1, 2), task_id=fixed)
        assert first.get(timeout=30) == 3
        first.forget()
        assert tasks.add.apply_async((2, 3), task_id=fixed).get(timeout=30) == 5
    assert "already published" not in worker.log()


def test_revoked_task_resent_with_its_id(db_url: str, tmp_path: Path) -> None:
    """A task scheduled for later is revoked (the worker remembers the id
    until it restarts), its message and result are removed, and it is sent
    again with its id, to run now: it runs."""
    env = celery_env(db_url)
    with client_app(APP, db_url) as tasks:
        with start_worker(APP, env, tmp_path, name="w1") as w1:
            w1.wait_for_log("ready.")
            task_id = str(uuid.uuid4())
            tasks.add.apply_async((1, 1), task_id=task_id, countdown=3600)
            tasks.app.control.revoke(task_id)
            w1.wait_for_log(task_id)  # "Tasks flagged as revoked: <id>"
        # What an operator does to drop a scheduled task from the broker;
        # and the REVOKED result (Celery 5.7 stores it at revoke) goes.
        execute(db_url, "DELETE FROM pgbroker.message WHERE task_id = %s", (task_id,))
        tasks.app.AsyncResult(task_id).forget()
        resent = tasks.add.apply_async((2, 2), task_id=task_id)
        # Stored, not taken for a duplicate of the revoked message.
        assert execute(db_url, "SELECT 1 FROM pgbroker.message WHERE task_id = %s", (task_id,))
        with start_worker(APP, env, tmp_path, name="w2") as w2:
            w2.wait_for_log("ready.")
            assert resent.get(timeout=30) == 4


def test_replacement_is_handed_off_once_when_the_worker_dies(db_url: str, tmp_path: Path) -> None:
    """The replaced task's worker is SIGKILLed after publishing the
    replacement, before its ack: the redelivered task runs again and
    replaces itself again, and that second replacement is not stored (the
    same message's run published it); the replacement runs once."""
    env = celery_env(db_url, TEST_MARKER_DIR=str(tmp_path))
    with client_app(APP, db_url) as tasks:
        # w1 does not consume the replacements' queue: nothing runs them
        # before the kill.
        with start_worker(APP, env, tmp_path, name="w1", extra=("-Q", "celery")) as w1:
            w1.wait_for_log("ready.")
            result = tasks.replaced_then_killed.delay("k")
            assert w1.wait_exit(60) == -9
        assert (tmp_path / "killed-after-replace").exists()
        assert execute(db_url, "SELECT queue, state FROM pgbroker.message ORDER BY id") == [
            ("celery", "reserved"),
            ("replacements", "ready"),
        ]
        with start_worker(APP, env, tmp_path, name="w2", extra=("-Q", "celery,replacements")) as w2:
            w2.wait_for_log("ready.")
            assert result.get(timeout=60) == "k replaced"
            wait_until(
                lambda: not execute(db_url, "SELECT 1 FROM pgbroker.message"),
                30,
                "every message to be acknowledged",
            )
            assert "already published" in w2.log()
    assert (tmp_path / "replacement-k").read_text().count("\n") == 1
