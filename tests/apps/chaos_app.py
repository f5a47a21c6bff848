"""The Celery app of the chaos test (tests/test_chaos.py).

Chains of ``link`` tasks; each link is a :class:`DurableTask` with three
checkpointed steps:

* ``s0`` and ``s2`` run with ``conn=``: their side effect (a row in
  ``chaos_effect``) commits in the checkpoint's transaction, so a step whose
  checkpoint committed ran exactly once: two rows for one step is a bug;
* ``s1`` runs without ``conn=`` (at least once): its row in ``chaos_loose``
  may be written twice when its process dies between the body and the
  checkpoint; counted, not a bug.

Every run of a task, and every step start, is logged in ``chaos_event``
with the process id and the time, so the test can tell how long work took
to resume after a kill. The tables are created by the test. The app's own
connections are named ``chaos-app``, so the test's session killer (which
targets pgbroker's sessions, named ``pgbroker:...``) leaves them alone.
"""

from __future__ import annotations

import os
import random
import time

import psycopg
from celery import Celery

from pgbroker.durable import DurableTask

BROKER_URL = os.environ["TEST_BROKER_URL"]
#: Seconds of pretend work in each step, at most: widens the windows a kill
#: can land in.
WORK = float(os.environ.get("CHAOS_STEP_WORK", "0.02"))

app = Celery("chaos_app")
app.conf.update(
    broker_url=BROKER_URL,
    result_backend=BROKER_URL,
    # A dead consumer's messages go back to their queue within a second.
    broker_transport_options={"sweep_interval": 1.0},
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)


def _db() -> psycopg.Connection:
    return psycopg.connect(
        "postgresql://" + BROKER_URL.partition("://")[2],
        autocommit=True,
        application_name="chaos-app",
    )


def _event(conn: psycopg.Connection, task_id: str, chain: int, pos: int, event: str) -> None:
    conn.execute(
        "INSERT INTO chaos_event (task_id, chain, pos, event, pid, at) "
        "VALUES (%s, %s, %s, %s, %s, %s)",
        (task_id, chain, pos, event, os.getpid(), time.time()),
    )


def _work() -> None:
    time.sleep(random.uniform(0, WORK))


def effect(conn: psycopg.Connection, chain: int, pos: int, step: str) -> str:
    _work()
    conn.execute(
        "INSERT INTO chaos_effect (chain, pos, step, pid) VALUES (%s, %s, %s, %s)",
        (chain, pos, step, os.getpid()),
    )
    return f"{chain}.{pos}.{step}"


def loose(chain: int, pos: int, step: str) -> str:
    _work()
    with _db() as conn:
        conn.execute(
            "INSERT INTO chaos_loose (chain, pos, step, pid) VALUES (%s, %s, %s, %s)",
            (chain, pos, step, os.getpid()),
        )
    return f"{chain}.{pos}.{step}"


@app.task(shared=False, bind=True, base=DurableTask)
def link(self: DurableTask, chain: int, pos: int) -> str:
    task_id = self.request.id
    with _db() as conn:
        _event(conn, task_id, chain, pos, "run")
        for step in ("s0", "s1", "s2"):
            _event(conn, task_id, chain, pos, f"start {step}")
            if step == "s1":
                self.step(step, loose, chain, pos, step)
            else:
                self.step(step, effect, conn, chain, pos, step, conn=conn)
        _event(conn, task_id, chain, pos, "done")
    return f"{chain}.{pos}"
