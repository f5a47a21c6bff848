"""A worker whose pgbroker sessions are terminated while it starts comes up
"ready." (after reconnecting) instead of exiting.

Found by the chaos test (tests/test_chaos.py): a restarted worker exited
before "ready." when its session was terminated at the first consumer's
registration. The broker's fingerprint (``database_fingerprint``, asked
for as the consumer registers, during the pidbox queue's declare) ran on
the transport's session without the transport's error classing, so a lost
session left it as psycopg's ``AdminShutdown``, which is no connection error:
Celery stopped the worker with "Unrecoverable error" instead of
reconnecting. (The log then ended with a ``ConnectionLost: ... is
closed`` traceback from the event loop's sweep timer, run as the worker
shut down.)

The worker (tests/apps/startup_faults_app.py) ends its own session just
before the first run of each startup statement in ``STEPS``, one after
the other, each on the session the previous reconnect opened: the
worker must log Celery's reconnect line for each, come up "ready.", stay
up, and run a task.
"""

from __future__ import annotations

from pathlib import Path

from tests.celery_helpers import celery_env, client_app, start_worker

APP = "tests.apps.startup_faults_app"

#: Statements a worker runs on its consumer's session as it starts, from
#: opening the session to consuming: the process lock (as it connects),
#: the consumer's registration and the broker's fingerprint (at the first
#: declare that needs the consumer), a queue's declare and bind, the
#: attach of a consumed queue.
STEPS = [
    "process_lock",
    "register_consumer",
    "database_fingerprint",
    "declare_queue",
    "bind",
    "attach_queue",
]

#: Seconds for the worker to come up: each fault costs a reconnect, one of
#: them (as the session opens) Celery's first retry interval, 2 s.
READY_TIMEOUT = 60
RESULT_TIMEOUT = 30


def test_worker_survives_sessions_terminated_at_each_startup_step(
    db_url: str, tmp_path: Path
) -> None:
    env = celery_env(db_url, STARTUP_FAULTS=",".join(STEPS))
    with start_worker(APP, env, tmp_path) as worker:
        log = worker.wait_for_log("ready.", timeout=READY_TIMEOUT)
        for step in STEPS:
            assert f"before {step}" in log, f"no fault injected before {step}:\n{log}"
        assert "Unrecoverable error" not in log, log
        # One reconnect per fault, each said in Celery's own words.
        retries = log.count("Connection to broker lost") + log.count("Cannot connect to")
        assert retries >= len(STEPS), log
        with client_app(APP, db_url) as tasks:
            assert tasks.add.delay(2, 3).get(timeout=RESULT_TIMEOUT) == 5
        assert worker.proc.poll() is None, worker.log()
