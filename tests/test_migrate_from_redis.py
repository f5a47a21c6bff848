"""docs/migrating-from-redis.md, step by step, against a real Redis.

Tasks queued on Redis (with priorities, an ETA and arguments that are easy
to mangle) are moved into PostgreSQL with Celery's own
``celery migrate redis://... postgresql://... --ack-messages``; a pgbroker
worker then runs every one of them exactly once, with its arguments intact,
highest priority first, and Redis is left empty. The doc's Python variant
(``migrate_tasks`` with a function that inverts priorities) is checked too.

Uses the Redis in ``PGBROKER_TEST_REDIS_URL`` (tests/refbrokers.py): a queue
name unique to the test, and only that queue's keys are deleted afterwards.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import kombu.pools
import psycopg
import pytest

from tests import refbrokers
from tests.celery_helpers import celery_env, client_app, run_celery, started, wait_until

REDIS_URL = refbrokers.REDIS_URL
APP = "tests.apps.redis_migrate"
# Redis's priority steps (kombu's PRIORITY_STEPS), so that both brokers keep
# the exact value; Redis serves 0 first, pgbroker (like AMQP) 9 first.
PRIORITIES = [0, 3, 6, 9]
N = 24
LOG_TABLE = (
    "CREATE TABLE migrate_log (seq bigint GENERATED ALWAYS AS IDENTITY, task_id text, "
    "args json, kwargs json, priority int, ran_at timestamptz DEFAULT clock_timestamp())"
)


@pytest.fixture
def redis_queue() -> Iterator[tuple[Any, str]]:
    client = refbrokers.redis_client_or_skip()
    queue = refbrokers.unique_name("migrate")
    try:
        yield client, queue
    finally:
        refbrokers.delete_keys(client, f"*{queue}*")
        client.close()


def redis_backlog(client: Any, queue: str) -> int:
    """Messages waiting in the queue's Redis lists, all priority steps."""
    return sum(int(client.llen(key)) for key in client.scan_iter(match=f"{queue}*"))


@pytest.fixture
def app_env(db_url: str, db: psycopg.Connection, redis_queue: tuple[Any, str]) -> dict[str, str]:
    """The test app's settings: results (and the execution log) in PostgreSQL."""
    db.execute(LOG_TABLE)
    return {"TEST_RESULT_URL": db_url, "TEST_QUEUE": redis_queue[1]}


@contextlib.contextmanager
def with_app(broker_url: str, env: dict[str, str]) -> Iterator[ModuleType]:
    """The test app imported here, bound to broker_url (it reads env on import)."""
    os.environ.update(env)
    try:
        with client_app(APP, broker_url) as mod:
            for key in env:
                os.environ.pop(key, None)
            yield mod
    finally:
        for key in env:
            os.environ.pop(key, None)
        # Kombu keeps producer pools per broker URL for the whole process;
        # client_app closed this one, and the next test uses the same URL.
        kombu.pools.reset()


def send_tasks(mod: ModuleType, eta: dt.datetime | None = None) -> dict[str, dict[str, Any]]:
    """N tasks (and one with an ETA) waiting in the app's broker, no worker running."""
    sent: dict[str, dict[str, Any]] = {}
    for i in range(N):
        args = (i, "é✓ \x00 'quoted' \"double\"", {"nested": [i, None, 1.5]})
        kwargs = {"big": "x" * 1000, "n": i}
        priority = PRIORITIES[i % len(PRIORITIES)]
        result = mod.record.apply_async(args, kwargs, priority=priority)
        sent[result.id] = {"args": args, "kwargs": kwargs, "priority": priority}
    if eta is not None:
        later = mod.record.apply_async(("eta",), eta=eta)
        sent[later.id] = {"args": ("eta",), "kwargs": {}, "priority": None, "eta": eta}
    return sent


def run_pgbroker_worker(
    db_url: str, db: psycopg.Connection, env: dict[str, str], n: int, log_dir: Path
) -> list[tuple[Any, ...]]:
    """A worker on pgbroker, one task at a time, until n tasks have run."""
    args = ["worker", "--pool=solo", "-Q", env["TEST_QUEUE"], "-l", "info", "-n", "pg@%h"]
    with started("worker", APP, args, celery_env(db_url, **env), log_dir):
        wait_until(
            lambda: db.execute("SELECT count(*) FROM migrate_log").fetchone() == (n,),
            90,
            "every migrated task to run",
        )
    return db.execute(
        "SELECT task_id, args, kwargs, priority, ran_at FROM migrate_log ORDER BY seq"
    ).fetchall()


def check_ran_once_intact(log: list[tuple[Any, ...]], sent: dict[str, dict[str, Any]]) -> None:
    assert sorted(row[0] for row in log) == sorted(sent)
    for task_id, got_args, got_kwargs, _, _ in log:
        assert got_args == _jsonable(sent[task_id]["args"]), task_id
        assert got_kwargs == sent[task_id]["kwargs"], task_id


def test_celery_migrate_moves_queued_tasks_from_redis_to_pgbroker(
    db_url: str,
    db: psycopg.Connection,
    redis_queue: tuple[Any, str],
    app_env: dict[str, str],
    tmp_path: Path,
) -> None:
    client, queue = redis_queue
    eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=20)
    with with_app(REDIS_URL, app_env) as mod:
        sent = send_tasks(mod, eta=eta)
    assert redis_backlog(client, queue) == N + 1

    migrate = ["migrate", REDIS_URL, db_url, "--queues", queue, "--timeout", "3"]
    env = celery_env(REDIS_URL, **app_env)
    # A first run without --ack-messages copies: Redis keeps every message.
    proc = run_celery(APP, migrate, env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert redis_backlog(client, queue) == N + 1
    # The real run moves them, acking each on Redis once PostgreSQL has it.
    # The copies made above are not stored twice (pgbroker stores a task id
    # once per routing), so a run interrupted half way can be run again.
    proc = run_celery(APP, [*migrate, "--ack-messages"], env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Migrating task {N + 1}/" in proc.stdout, proc.stdout + proc.stderr
    assert redis_backlog(client, queue) == 0
    stored = db.execute(
        "SELECT task_id, priority FROM pgbroker.message WHERE queue = %s", [queue]
    ).fetchall()
    assert len(stored) == N + 1
    # Each message keeps the priority number it was sent with.
    assert {t: p for t, p in stored if sent[t]["priority"] is not None} == {
        t: s["priority"] for t, s in sent.items() if s["priority"] is not None
    }

    log = run_pgbroker_worker(db_url, db, app_env, N + 1, tmp_path)
    check_ran_once_intact(log, sent)
    # Served highest number first, FIFO within a priority: the reverse of
    # Redis's order. (The ETA task aside: it waits for its time.)
    ran = [row for row in log if sent[row[0]]["priority"] is not None]
    priorities = [s["priority"] for s in sent.values() if s["priority"] is not None]
    assert [row[3] for row in ran] == sorted(priorities, reverse=True)
    for priority in PRIORITIES:
        order = [row[1][0] for row in ran if row[3] == priority]
        assert order == sorted(order), (priority, order)
    # The ETA travelled in the message: the task did not run early.
    assert next(row[4] for row in log if "eta" in sent[row[0]]) >= eta
    # Nothing left; the results are rows in PostgreSQL.
    assert db.execute("SELECT count(*) FROM pgbroker.message").fetchone() == (0,)
    assert db.execute(
        "SELECT count(*) FROM pgbroker.task_result WHERE state = 'SUCCESS'"
    ).fetchone() == (N + 1,)


def test_migrate_tasks_with_inverted_priorities_keeps_redis_order(
    db_url: str,
    db: psycopg.Connection,
    redis_queue: tuple[Any, str],
    app_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """The doc's Python recipe: options the CLI cannot pass, and priorities
    rewritten as 9 - p so that the backlog keeps Redis's service order."""
    from celery.contrib.migrate import migrate_tasks, republish
    from kombu import Connection

    client, queue = redis_queue
    with with_app(REDIS_URL, app_env) as mod:
        sent = send_tasks(mod)

        def invert_priority(producer: Any, body: Any, message: Any, queues: Any = None) -> None:
            message.properties["priority"] = 9 - (message.properties.get("priority") or 0)
            republish(producer, message)

        source = Connection(REDIS_URL, transport_options={})
        dest = Connection(db_url, transport_options={"schema": "pgbroker"})
        with source, dest:
            state = migrate_tasks(
                source,
                dest,
                migrate=invert_priority,
                app=mod.app,
                queues=[queue],
                ack_messages=True,
                timeout=3,
            )
    assert state.count == N
    assert redis_backlog(client, queue) == 0

    log = run_pgbroker_worker(db_url, db, app_env, N, tmp_path)
    check_ran_once_intact(log, sent)
    # Redis's order: the lowest original priority first.
    originals = [sent[row[0]]["priority"] for row in log]
    assert originals == sorted(originals)


def _jsonable(value: Any) -> Any:
    """What a tuple becomes after a JSON round trip."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def test_the_way_back_pgbroker_to_redis(
    db_url: str,
    db: psycopg.Connection,
    redis_queue: tuple[Any, str],
    app_env: dict[str, str],
) -> None:
    """The doc's rollback plan: the same command, the other way round."""
    client, queue = redis_queue
    with with_app(db_url, app_env) as mod:
        sent = send_tasks(mod)  # on pgbroker this time
    assert db.execute("SELECT count(*) FROM pgbroker.message").fetchone() == (N,)
    proc = run_celery(
        APP,
        ["migrate", db_url, REDIS_URL, "--queues", queue, "--ack-messages", "--timeout", "3"],
        celery_env(db_url, **app_env),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert db.execute("SELECT count(*) FROM pgbroker.message").fetchone() == (0,)
    assert redis_backlog(client, queue) == N
    waiting = [
        json.loads(raw)["headers"]["id"]
        for key in client.scan_iter(match=f"{queue}*")
        for raw in client.lrange(key, 0, -1)
    ]
    assert sorted(waiting) == sorted(sent)
