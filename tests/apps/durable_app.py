"""A Celery app whose durable task survives the SIGKILL of its worker.

``onboard`` has three steps; each step's body records a row in the
``effect`` table and each run of the task one in ``run`` (tables of the
broker's own database, created by the test), so the test counts how often
each body ran, across workers. After its second step, the first run writes
``pause_file`` (a signal to the test: step 2 is committed, kill me now) and
waits to be killed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psycopg
from celery import Celery

from pgbroker.durable import DurableTask

BROKER_URL = os.environ["TEST_BROKER_URL"]

app = Celery("durable_app")
app.conf.broker_url = BROKER_URL
app.conf.result_backend = "rpc://"
app.conf.broker_transport_options = {
    "sweep_interval": float(os.environ.get("TEST_SWEEP_INTERVAL", "0.5"))
}
# One task at a time per process: nothing else is reserved behind it.
app.conf.worker_prefetch_multiplier = 1
# A pool process killed mid-task (OOM killer) puts its task back in the queue.
app.conf.task_reject_on_worker_lost = True


def _db() -> psycopg.Connection:
    return psycopg.connect("postgresql://" + BROKER_URL.partition("://")[2], autocommit=True)


def _effect(conn: psycopg.Connection, key: str, step: str) -> None:
    conn.execute(
        "INSERT INTO effect (key, step, pid) VALUES (%s, %s, %s)", (key, step, os.getpid())
    )


def create_account(key: str) -> dict[str, Any]:
    with _db() as conn:
        _effect(conn, key, "create_account")
    return {"key": key, "account": f"acct-{key}"}


def charge(conn: psycopg.Connection, account: dict[str, Any]) -> str:
    # Runs in the step's transaction on conn: the effect row and the
    # checkpoint commit together.
    _effect(conn, account["key"], "charge")
    return f"charge-{account['account']}"


def send_welcome(account: dict[str, Any]) -> str:
    with _db() as conn:
        _effect(conn, account["key"], "welcome_email")
    return f"welcome sent to {account['account']}"


def _pause_once(pause_file: str) -> None:
    """The first time: tell the test (pause_file holds our pid) and wait to
    be killed."""
    if not pause_file or os.path.exists(pause_file):
        return
    tmp = f"{pause_file}.tmp"
    Path(tmp).write_text(str(os.getpid()))
    os.rename(tmp, pause_file)  # appears complete
    time.sleep(60)


@app.task(shared=False, bind=True, base=DurableTask, acks_late=True)
def onboard(self: DurableTask, key: str, pause_file: str = "") -> dict[str, Any]:
    with _db() as conn:
        conn.execute("INSERT INTO run (key, pid) VALUES (%s, %s)", (key, os.getpid()))
    account = self.step("create_account", create_account, key)
    with _db() as conn:
        charge_id = self.step("charge", charge, conn, account, conn=conn)
    _pause_once(pause_file)
    mail = self.step("welcome_email", send_welcome, account)
    return {"account": account["account"], "charge": charge_id, "mail": mail, "pid": os.getpid()}


@app.task(shared=False, bind=True, base=DurableTask, acks_late=True, max_retries=3, durable_keep=0)
def retried(self: DurableTask, key: str) -> str:
    """Asks Celery for a retry after its first step, once."""
    account = self.step("create_account", create_account, key)
    if self.request.retries == 0:
        raise self.retry(countdown=0.2)
    mail = self.step("welcome_email", send_welcome, account)
    return f"{mail} after {self.request.retries} retry"
