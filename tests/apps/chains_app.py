"""Chains of durable links, for the tests that break things under a running
worker: a failover of the database (tests/test_ha_failover.py), a worker
killed behind PgBouncer (tests/test_pgbouncer.py). tests/chain_ledger.py
creates the tables, publishes the chains and counts.

Each ``link`` task is a :class:`DurableTask` with two steps that run with
``conn=``: the step's row in ``link_effect`` commits in its checkpoint's
transaction, so two rows for one step mean a completed step ran again.
Every step also appends a line to the file ``LINK_STEP_LOG`` before its
transaction commits: work done outside the database, which a step whose
commit was lost does again (at least once by design), counted, not a bug.

The task's own sessions can die too (with a failed primary): the task then
fails with psycopg's ``OperationalError`` and is retried by Celery
(``autoretry_for``), as an application would do it; its recorded steps
replay.
"""

from __future__ import annotations

import os
import time

import psycopg
from celery import Celery

from pgbroker.durable import DurableTask

BROKER_URL = os.environ["TEST_BROKER_URL"]
STEP_LOG = os.environ.get("LINK_STEP_LOG", os.devnull)

app = Celery("chains_app")
app.conf.update(
    broker_url=BROKER_URL,
    result_backend=BROKER_URL,
    broker_transport_options={"sweep_interval": 1.0},
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    # A publish during the failover (a client's apply_async, a retry) waits
    # for the new primary for up to about 30 s instead of failing at once.
    task_publish_retry_policy={
        "max_retries": 60,
        "interval_start": 0,
        "interval_step": 0.5,
        "interval_max": 0.5,
    },
)


def _db() -> psycopg.Connection:
    return psycopg.connect(
        "postgresql://" + BROKER_URL.partition("://")[2],
        autocommit=True,
        application_name="chains-app",
        connect_timeout=2,
    )


def effect(conn: psycopg.Connection, chain: int, pos: int, step: str) -> str:
    time.sleep(0.005)
    with open(STEP_LOG, "a") as log:
        log.write(f"{chain} {pos} {step}\n")
    conn.execute(
        "INSERT INTO link_effect (chain, pos, step, pid) VALUES (%s, %s, %s, %s)",
        (chain, pos, step, os.getpid()),
    )
    return f"{chain}.{pos}.{step}"


@app.task(
    shared=False,
    bind=True,
    base=DurableTask,
    autoretry_for=(psycopg.OperationalError,),
    max_retries=None,
    default_retry_delay=0.2,
)
def link(self: DurableTask, chain: int, pos: int) -> str:
    with _db() as conn:
        for step in ("s0", "s1"):
            self.step(step, effect, conn, chain, pos, step, conn=conn)
    return f"{chain}.{pos}"
