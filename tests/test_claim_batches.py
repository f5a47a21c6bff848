"""A Celery worker claims a backlog in batches, not one claim per task.

Celery acknowledges a task as its pool starts it, freeing one slot of the
prefetch window at a time. In Celery's event loop a consumer that holds
messages claims again once half of its window is free, or after
``CLAIM_BATCH_WAIT`` (pgbroker/broker/consumer.py): one claim per few tasks,
each carrying the acks made meanwhile. Measured in a 5,000-task run with a
window of 8: 1,253 claims, 4,436 when each free slot was claimed at once.

A claim is a transaction that reserves messages (``UPDATE message``, or
``DELETE message`` first when it carries acks); a task's finish starts with
its result (``INSERT task_result``). The commit-log trigger records each.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
from celery import group

from pgbroker.broker.consumer import CLAIM_BATCH_WAIT
from tests.celery_helpers import celery_env, client_app, execute, start_worker, wait_until
from tests.commit_log import record_durable_commits

APP = "tests.apps.delivery_app"
TASKS = 200
PREFETCH = 8  # --concurrency=2 x --prefetch-multiplier=4, Celery's default multiplier


def claims(db_url: str) -> int:
    rows = execute(
        db_url,
        "SELECT count(*) FROM public.commit_log"
        " WHERE first IN ('UPDATE message', 'DELETE message')",
    )
    return int(rows[0][0])


def test_a_backlog_is_claimed_in_batches(
    db_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    record_durable_commits(db)
    with client_app(APP, db_url) as tasks:
        result = group(tasks.link.s(i) for i in range(TASKS)).apply_async()
        db.execute("TRUNCATE public.commit_log")  # the backlog is in: count from here
        with start_worker(
            APP, celery_env(db_url), tmp_path, extra=("-Q", "celery", "--prefetch-multiplier", "4")
        ):
            assert result.get(timeout=120) == [i + 1 for i in range(TASKS)]
            # Every early ack is written, the last ones with no claim to ride on.
            wait_until(
                lambda: execute(db_url, "SELECT count(*) FROM pgbroker.message") == [(0,)],
                timeout=10,
                what="every ack written",
            )
    claimed = claims(db_url)
    print(f"{claimed} claims for {TASKS} tasks (window {PREFETCH}, wait {CLAIM_BATCH_WAIT} s)")
    # One claim per free slot would be about TASKS; batches of half the
    # window, about TASKS / (PREFETCH / 2). Claims cut short by the wait
    # (a task slower than the rest) come between.
    assert claimed <= TASKS // 2, claimed
