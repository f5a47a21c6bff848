"""SIGKILL a worker in the middle of acks_late tasks: nothing is lost.

The killed worker's messages stay reserved by its consumer row until its
PostgreSQL session ends; then the next sweep of a live worker (every
``sweep_interval``, and once when a worker starts) hands them back to the
queue, and another worker runs them again.

The test process watches the ``attempt`` table rather than waiting on results
until the tasks have run again: waiting on a result makes it a consumer, and
every consumer sweeps, while the point is that the *workers* recover.
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import psycopg

from pgbroker.options import TransportOptions
from tests.celery_helpers import celery_env, client_app, execute, start_worker, wait_until

APP = "tests.apps.recovery"
SWEEP_INTERVAL = 1.0
DEFAULT_SWEEP_INTERVAL = TransportOptions().sweep_interval
LONG = 30.0  # the first attempt of a long task outlives the test by far
RESULT_TIMEOUT = 60
REQUEUED = "requeued {} message(s) held by consumers whose sessions ended"

Attempt = tuple[int, float]  # (pid, started at)


def setup_attempt_table(db: psycopg.Connection) -> None:
    db.execute(
        "CREATE TABLE attempt (id bigserial PRIMARY KEY, key text NOT NULL, "
        "pid int NOT NULL, started double precision NOT NULL)"
    )


def attempts(db_url: str, key: str) -> list[Attempt]:
    rows = execute(db_url, "SELECT pid, started FROM attempt WHERE key = %s ORDER BY id", (key,))
    return [(int(pid), float(started)) for pid, started in rows]


def wait_for_attempts(db_url: str, keys: list[str], count: int) -> dict[str, list[Attempt]]:
    def all_there() -> dict[str, list[Attempt]] | None:
        runs = {key: attempts(db_url, key) for key in keys}
        return runs if all(len(run) == count for run in runs.values()) else None

    return wait_until(all_there, 40, f"{keys} to have run {count} time(s)")


def sessions_of(db_url: str, pid: int) -> int:
    """PostgreSQL sessions opened by pgbroker in process ``pid``."""
    name = f"pgbroker:{socket.gethostname()}:{pid}"
    rows = execute(
        db_url, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name,)
    )
    return int(rows[0][0])


def wait_for_empty_queue(db_url: str) -> None:
    """Every message was acknowledged: nothing is left in the queue."""
    wait_until(
        lambda: not execute(db_url, "SELECT id FROM pgbroker.message WHERE queue = 'celery'"),
        15,
        "the celery queue to be empty",
    )


def test_sigkill_main_process_redelivers_to_live_worker(
    db_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    """Kill only the worker's main process while two long tasks run in its
    children; a second, already running worker gets them back."""
    setup_attempt_table(db)
    env = celery_env(db_url, TEST_SWEEP_INTERVAL=str(SWEEP_INTERVAL))
    long_keys = ["long1", "long2"]
    with client_app(APP, db_url) as tasks, start_worker(APP, env, tmp_path, "a") as a:
        a.wait_for_log("ready.")
        long_results = {key: tasks.long_once.delay(key, LONG) for key in long_keys}
        first = wait_for_attempts(db_url, long_keys, 1)
        # Worker a holds both (prefetch 2); quick ones queue up behind them.
        quick_results = {key: tasks.long_once.delay(key, 0) for key in ("q1", "q2", "q3")}
        children = [pid for pid in a.group_pids() if pid != a.pid]
        assert len(children) == 2
        assert {run[0][0] for run in first.values()} == set(children)
        assert sessions_of(db_url, a.pid) >= 1

        with start_worker(APP, env, tmp_path, "b") as b:
            b.wait_for_log("ready.")
            for key, result in quick_results.items():
                assert result.get(timeout=RESULT_TIMEOUT) == f"{key} done on attempt 1"

            a.signal(signal.SIGKILL)
            killed_at = time.time()
            a.wait_exit(timeout=10)

            # Celery's prefork children die with their parent (the pool sets
            # PR_SET_PDEATHSIG), and every session the parent opened ends:
            # none survives in a child that inherited its socket.
            wait_until(lambda: not a.group_pids(), 10, "worker a's children to die")
            wait_until(lambda: sessions_of(db_url, a.pid) == 0, 10, "worker a's sessions to end")

            runs = wait_for_attempts(db_url, long_keys, 2)
            delay = max(run[1][1] for run in runs.values()) - killed_at
            print(f"\nSIGKILL of the main process -> tasks started again on b: {delay:.2f} s")
            # From b's sweep handing the messages back to their start in b's
            # pool: no wait for a timer (see Transport._on_tick).
            swept = execute(db_url, "SELECT extract(epoch FROM max(at)) FROM pgbroker.redelivery")
            handover = max(run[1][1] for run in runs.values()) - float(swept[0][0])
            print(f"sweep -> tasks started in b's pool: {handover:.3f} s")
            assert handover < 0.5
            assert REQUEUED.format(2) in b.log()
            assert all(run[1][0] not in children for run in runs.values())
            # One sweep interval, plus generous slack for a busy machine.
            assert delay < SWEEP_INTERVAL + 10
            for key, result in long_results.items():
                assert result.get(timeout=RESULT_TIMEOUT) == f"{key} done on attempt 2"

            redelivered = execute(db_url, "SELECT task_id FROM pgbroker.redelivery")
            assert sorted(r[0] for r in redelivered) == sorted(r.id for r in long_results.values())
            wait_for_empty_queue(db_url)
    assert not execute(db_url, "SELECT id FROM pgbroker.dead_letter")


def test_sigkill_process_group_then_restart(
    db_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    """Kill the worker with all its children (a container or machine dying),
    then start a new worker with the default options: it sweeps as it
    starts, so the task comes back at once, not a sweep_interval (10 s)
    later."""
    setup_attempt_table(db)
    env = celery_env(db_url)
    with client_app(APP, db_url) as tasks:
        with start_worker(APP, env, tmp_path, "a") as a:
            a.wait_for_log("ready.")
            result = tasks.long_once.delay("job", LONG)
            wait_for_attempts(db_url, ["job"], 1)
            a.kill_group()
            killed_at = time.time()
            a.wait_exit(timeout=10)

        with start_worker(APP, env, tmp_path, "b") as b:
            b.wait_for_log("ready.")
            ready_at = time.time()
            started = wait_for_attempts(db_url, ["job"], 2)["job"][1][1]
            print(
                f"\nSIGKILL of the process group -> task started again on a new worker: "
                f"{started - killed_at:.2f} s after the kill, "
                f"{started - ready_at:.2f} s after the new worker was ready"
            )
            assert REQUEUED.format(1) in b.log()
            # Well before the first periodic sweep, one interval after start.
            assert started - ready_at < DEFAULT_SWEEP_INTERVAL - 2
            assert result.get(timeout=RESULT_TIMEOUT) == "job done on attempt 2"
            wait_for_empty_queue(db_url)
