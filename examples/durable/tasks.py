"""The durable example's tasks: a three-step onboarding that is never
charged twice, even when its worker is killed in the middle.

Each step's body writes a line to the ``durable_demo_log`` table (created by
run.py), so the demo can count how many times each one ran. The example keeps
its tables, and pgbroker's, in a schema of its own (``PGBROKER_EXAMPLE_SCHEMA``,
default ``pgbroker_durable_example``), so it never touches an application's
``pgbroker`` schema or its queues.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psycopg
from celery import Celery
from psycopg import sql

from pgbroker.durable import DurableTask

DATABASE_URL = os.environ.get("PGBROKER_URL", "postgresql://localhost/postgres")
SCHEMA = os.environ.get("PGBROKER_EXAMPLE_SCHEMA", "pgbroker_durable_example")
LOG_TABLE = sql.Identifier(SCHEMA, "durable_demo_log")

app = Celery("durable_example")
app.conf.broker_url = DATABASE_URL  # the step records live in this database too
app.conf.result_backend = DATABASE_URL
# The queues, results and step records in the example's schema. A dead
# worker's tasks go back to the queue within a second.
app.conf.broker_transport_options = {"schema": SCHEMA, "sweep_interval": 1.0}
app.conf.result_backend_transport_options = {"schema": SCHEMA}
app.conf.worker_prefetch_multiplier = 1
# A pool process killed mid-task (e.g. by the OOM killer) requeues its task.
app.conf.task_reject_on_worker_lost = True


def connect() -> psycopg.Connection:
    return psycopg.connect(DATABASE_URL, autocommit=True)


def log(conn: psycopg.Connection, user_id: int, step: str) -> None:
    conn.execute(
        sql.SQL("INSERT INTO {} (user_id, step, pid) VALUES (%s, %s, %s)").format(LOG_TABLE),
        (user_id, step, os.getpid()),
    )


# --- the steps: ordinary functions ---------------------------------------------------


def create_account(user_id: int) -> dict[str, Any]:
    with connect() as conn:
        log(conn, user_id, "create_account")
    return {"user_id": user_id, "account": f"acct-{user_id}"}


def charge_card(conn: psycopg.Connection, account: dict[str, Any], cents: int) -> str:
    # Runs inside the step's transaction on conn: this row and the step's
    # checkpoint commit together, or neither does.
    log(conn, account["user_id"], "charge")
    return f"ch_{account['account']}_{cents}"


def send_welcome(account: dict[str, Any]) -> str:
    with connect() as conn:
        log(conn, account["user_id"], "welcome_email")
    return f"welcome mail sent to {account['account']}"


# --- the task --------------------------------------------------------------------------


@app.task(bind=True, base=DurableTask, acks_late=True)
def onboard(self: DurableTask, user_id: int) -> dict[str, Any]:
    account = self.step("create_account", create_account, user_id)
    with connect() as conn:
        charge = self.step("charge", charge_card, conn, account, 4900, conn=conn)
    crash_point()
    mail = self.step("welcome_email", send_welcome, account, retries=3, backoff=0.5)
    return {"account": account["account"], "charge": charge, "mail": mail}


def crash_point() -> None:
    """For the demo only: the first time through, tell run.py that step 2 is
    committed (by creating DEMO_PAUSE_FILE, holding our pid) and wait to be
    killed."""
    pause_file = os.environ.get("DEMO_PAUSE_FILE")
    if not pause_file or os.path.exists(pause_file):
        return
    Path(f"{pause_file}.tmp").write_text(str(os.getpid()))
    os.rename(f"{pause_file}.tmp", pause_file)
    time.sleep(120)
