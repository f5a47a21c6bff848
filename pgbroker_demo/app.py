"""The Celery app that ``pgbroker demo`` runs: an order workflow of durable tasks.

    reserve_stock -> charge_payment -> ship_order

A chain of three :class:`~pgbroker.durable.DurableTask` tasks with seven
checkpointed steps. Each step's body writes its effect (a ``ran`` row in
``<schema>.demo_event``) inside the step's own transaction (``conn=``), so
the effect and the step's checkpoint commit together or not at all: a step
is exactly once. When a run of a task finds a step already checkpointed, the
body is skipped and the task records a ``replayed`` row instead, so the demo
can show what ran and what was skipped.

The demo starts the workers (``celery -A pgbroker_demo.app worker``) with
``PGBROKER_DEMO_URL`` and ``PGBROKER_DEMO_SCHEMA`` set. For the first worker
it also sets ``PGBROKER_DEMO_PAUSE_FILE``: once the step ``KILL_AFTER``
has committed, the task writes its pid to that file and waits, so the demo
kills the worker at the same point of the workflow every time.
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
from pgbroker.errors import ConfigurationError
from pgbroker_demo.run import KILL_AFTER, QUEUE, WORKFLOW

#: Seconds of pretend work in each step, so that the output can be followed.
WORK_SECONDS = 0.15

URL = os.environ.get("PGBROKER_DEMO_URL", "")
SCHEMA = os.environ.get("PGBROKER_DEMO_SCHEMA", "pgbroker_demo")
if not URL:
    raise ConfigurationError(
        "pgbroker_demo.app is the app of `pgbroker demo`, which sets PGBROKER_DEMO_URL "
        "for the workers it starts: run `pgbroker demo`"
    )

app = Celery("pgbroker_demo")
app.conf.update(
    broker_url=URL,
    result_backend=URL,
    # Everything in the demo's own schema: the user's pgbroker schema (and
    # its queues) are left alone.
    broker_transport_options={"schema": SCHEMA, "sweep_interval": 1.0},
    result_backend_transport_options={"schema": SCHEMA},
    task_default_queue=QUEUE,
    # The durable-task settings: a task whose worker dies is delivered again.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)


def connect() -> psycopg.Connection:
    return psycopg.connect("postgresql://" + URL.partition("://")[2], autocommit=True)


def record(conn: psycopg.Connection, task: DurableTask, step: str, number: int, event: str) -> None:
    node = str(task.request.hostname or "").partition("@")[0]
    conn.execute(
        sql.SQL(
            "INSERT INTO {}.demo_event (task, task_id, step, step_no, event, worker, pid, at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
        ).format(sql.Identifier(SCHEMA)),
        (task.short_name, task.request.id, step, number, event, node, os.getpid(), time.time()),
    )


class OrderTask(DurableTask):
    """Runs the steps of its part of the workflow, recording each one."""

    abstract = True
    short_name = ""

    def run_steps(self, order: dict[str, Any]) -> dict[str, Any]:
        order_id = order["order"]
        with connect() as conn:
            redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
            record(conn, self, "", 0, "redelivered" if redelivered else "start")
            for number, name in enumerate(WORKFLOW[self.short_name], start=1):
                ran = False

                def body(conn: psycopg.Connection, name: str = name, number: int = number) -> str:
                    nonlocal ran
                    ran = True
                    time.sleep(WORK_SECONDS)  # the step's real work would go here
                    record(conn, self, name, number, "ran")  # commits with the checkpoint
                    return f"{name}:{order_id}"

                output = self.step(name, body, conn, conn=conn)
                if not ran:
                    record(conn, self, name, number, "replayed")
                order = {**order, name: output}
                if (self.short_name, name) == KILL_AFTER:
                    _pause_once()
            record(conn, self, "", 0, "finish")
        return order


def _pause_once() -> None:
    """In the demo's first worker: say that the step committed, wait to be killed."""
    pause_file = os.environ.get("PGBROKER_DEMO_PAUSE_FILE")
    if not pause_file or os.path.exists(pause_file):
        return
    Path(f"{pause_file}.tmp").write_text(str(os.getpid()))
    os.rename(f"{pause_file}.tmp", pause_file)  # appears complete
    time.sleep(120)


@app.task(bind=True, base=OrderTask, short_name="reserve_stock")  # type: ignore[untyped-decorator]
def reserve_stock(self: OrderTask, order_id: str) -> dict[str, Any]:
    return self.run_steps({"order": order_id})


@app.task(bind=True, base=OrderTask, short_name="charge_payment")  # type: ignore[untyped-decorator]
def charge_payment(self: OrderTask, order: dict[str, Any]) -> dict[str, Any]:
    return self.run_steps(order)


@app.task(bind=True, base=OrderTask, short_name="ship_order")  # type: ignore[untyped-decorator]
def ship_order(self: OrderTask, order: dict[str, Any]) -> dict[str, Any]:
    return self.run_steps(order)
