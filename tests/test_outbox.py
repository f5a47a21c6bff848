"""A task's outbox: what its body sends goes out only with its success.

A task with ``pgbroker_outbox = True`` (pgbroker/broker/finish.py) holds
the Celery task messages its body sends while it runs and commits them in
the transaction that stores its success and acknowledges its message;
they are dropped if it fails or retries, and sent as the run ends when it
stores no outcome (``Ignore``). Each scenario runs ``send_then``, which
sends ``record(key)`` to the queue ``second`` (which no worker here
consumes) and then ends as told, beside the same body without the outbox
(``send_then_now``, sent when called): each test fails on the side that
behaves like the other.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from celery import Celery, chord

from pgbroker.broker.finish import outbox_on
from pgbroker.errors import ConfigurationError
from tests.apps.delivery_log import runs, setup_run_log
from tests.celery_helpers import celery_env, client_app, execute, start_worker, wait_until

APP = "tests.apps.delivery_app"
TASKS = [("send_then", True), ("send_then_now", False)]


def sent(db_url: str, key: str) -> list[tuple[int, str]]:
    """(xmin, state) of each ``record(key)`` message sent by the body."""
    return [
        (int(xmin), state)
        for xmin, state in execute(
            db_url,
            "SELECT xmin::text::bigint, state FROM pgbroker.message"
            " WHERE queue = 'second' AND headers->>'argsrepr' IN (%s, %s) ORDER BY id",
            (repr((key,)), repr([key])),  # as sent by .delay(), by a chord
        )
    ]


def result_xmin(db_url: str, task_id: str) -> int:
    rows = execute(
        db_url, "SELECT xmin::text::bigint FROM pgbroker.task_result WHERE task_id = %s", (task_id,)
    )
    assert len(rows) == 1, rows
    return int(rows[0][0])


@pytest.mark.parametrize(("task", "outbox"), TASKS)
def test_what_the_body_sends_goes_out_only_with_its_success(
    db_url: str, db: psycopg.Connection, tmp_path: Path, task: str, outbox: bool
) -> None:
    """Success: the body's message and the run's callback commit in the
    transaction of the result (same xmin) with the outbox, before it
    without. Failure and retry: the
    failed run's message is not sent with the outbox (its errback is).
    Ignore (no outcome stored): sent as the run ends, either way."""
    setup_run_log(db)
    env = celery_env(db_url)
    with (
        client_app(APP, db_url) as tasks,
        start_worker(APP, env, tmp_path, extra=("-Q", "celery")) as worker,
    ):
        worker.wait_for_log("ready.")
        send = getattr(tasks, task)

        # The body's message, and a callback (link) Celery sends as the run
        # succeeds: in the result's transaction with the outbox.
        callback = tasks.record.si("callback").set(queue="second")
        ok = send.apply_async(("ok", "succeed"), link=callback)
        assert ok.get(timeout=60) == "ok"
        [(xmin, state)] = sent(db_url, "ok")
        assert state == "ready"
        assert (xmin == result_xmin(db_url, ok.id)) is outbox
        [(xmin, _)] = sent(db_url, "callback")
        assert (xmin == result_xmin(db_url, ok.id)) is outbox

        errback = tasks.record.si("errback").set(queue="second")
        failed = send.apply_async(("failed", "fail"), link_error=errback)
        with pytest.raises(ValueError, match="failed on purpose"):
            failed.get(timeout=60)
        assert len(sent(db_url, "failed")) == (0 if outbox else 1)
        wait_until(lambda: sent(db_url, "errback"), 30, "the errback")  # sent either way

        retried = send.delay("retried", "retry")
        assert retried.get(timeout=60) == "retried"
        assert len(runs(db_url, task, "retried")) == 2
        # Only the successful run's message, in its result's transaction.
        assert len(sent(db_url, "retried")) == (1 if outbox else 2)
        assert (sent(db_url, "retried")[-1][0] == result_xmin(db_url, retried.id)) is outbox

        # A chord's body, sent as its last part's result is stored: when
        # sent, not held past the finish (as the run ends, after commits
        # that a kill could separate from it).
        body = tasks.record.si("body").set(queue="second")
        chord(send.s(f"part{i}", "succeed") for i in range(2))(body)
        wait_until(lambda: sent(db_url, "body"), 30, "the chord's body")
        assert [len(sent(db_url, f"part{i}")) for i in range(2)] == [1, 1]

        ignored = send.delay("ignored", "ignore")
        wait_until(lambda: sent(db_url, "ignored"), 30, "the ignored run's message")
        wait_until(
            lambda: not execute(db_url, "SELECT 1 FROM pgbroker.message WHERE queue = 'celery'"),
            30,
            "the ignored run's message to be acknowledged",
        )
        assert len(sent(db_url, "ignored")) == 1
        assert ignored.state == "PENDING"
        if outbox:
            assert "its body sent through its outbox are not sent" in worker.log()
        # Only the ignored run's message was held past its finish.
        released = [line for line in worker.log().splitlines() if "ended without storing" in line]
        assert all(ignored.id in line for line in released), released
        assert len(released) == (1 if outbox else 0)


@pytest.mark.parametrize(("task", "outbox"), TASKS)
def test_a_worker_killed_in_the_body_sends_nothing_through_the_outbox(
    db_url: str, db: psycopg.Connection, tmp_path: Path, task: str, outbox: bool
) -> None:
    """The worker is SIGKILLed in the body, after it sent ``record``: with
    the outbox nothing of the run is in PostgreSQL (its message is still
    held by the dead worker); without, ``record`` was sent. The message is
    delivered again (``acks_late``), the body runs again and succeeds:
    ``record`` is sent once with the outbox, twice without (two runs, two
    task ids: no deduplication can tell)."""
    setup_run_log(db)
    env = celery_env(db_url, TEST_SWEEP_INTERVAL="1", TEST_MARKER_DIR=str(tmp_path))
    with client_app(APP, db_url) as tasks:
        with start_worker(APP, env, tmp_path, name="w1", extra=("-Q", "celery")) as w1:
            w1.wait_for_log("ready.")
            result = getattr(tasks, task).delay("k", "kill")
            assert w1.wait_exit(60) == -9
        assert (tmp_path / "killed-in-body").exists()
        assert len(runs(db_url, task, "k")) == 1
        assert [state for _, state in sent(db_url, "k")] == ([] if outbox else ["ready"])
        assert execute(db_url, "SELECT state FROM pgbroker.message WHERE queue = 'celery'") == [
            ("reserved",)
        ]
        with start_worker(APP, env, tmp_path, name="w2", extra=("-Q", "celery")) as w2:
            w2.wait_for_log("ready.")
            assert result.get(timeout=60) == "k"
        assert len(runs(db_url, task, "k")) == 2
        assert len(sent(db_url, "k")) == (1 if outbox else 2)


def test_the_outbox_is_a_task_option_or_an_app_setting() -> None:
    app = Celery("outbox_settings", set_as_current=False)

    @app.task(shared=False)
    def plain() -> None: ...

    @app.task(shared=False, pgbroker_outbox=True)
    def opted() -> None: ...

    @app.task(shared=False, pgbroker_outbox=False)
    def opted_out() -> None: ...

    assert (outbox_on(plain), outbox_on(opted), outbox_on(opted_out)) == (False, True, False)
    app.conf.pgbroker_outbox = "yes"
    assert (outbox_on(plain), outbox_on(opted), outbox_on(opted_out)) == (True, True, False)
    app.conf.pgbroker_outbox = "sometimes"
    with pytest.raises(ConfigurationError, match="pgbroker_outbox must be True or False"):
        outbox_on(plain)
