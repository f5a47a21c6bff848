"""A Celery app for the tests of the sessions' settings (tests/test_session_settings.py):
pgbroker as broker, result backend, durable steps and beat, on a database
whose defaults (isolation, idle_session_timeout) would break sessions that
do not pin their own.

Every run of ``work`` is recorded in ``run_log`` (tests/apps/delivery_log.py).
"""

from __future__ import annotations

import os
import time
from typing import Any

import psycopg
from celery import Celery

from pgbroker.durable import DurableTask

BROKER_URL = os.environ["TEST_BROKER_URL"]

app = Celery("sessions_app")
app.conf.broker_url = BROKER_URL
app.conf.result_backend = BROKER_URL
app.conf.broker_connection_retry_on_startup = True
app.conf.worker_prefetch_multiplier = int(os.environ.get("TEST_PREFETCH", "4"))
app.conf.broker_transport_options = {
    "sweep_interval": 1.0,
    "max_deliveries": int(os.environ.get("TEST_MAX_DELIVERIES", "10")),
}
app.conf.beat_schedule = {"tick": {"task": "sessions_app.work", "schedule": 1.0, "args": ["beat"]}}
app.conf.beat_max_loop_interval = 1


def _db() -> psycopg.Connection:
    return psycopg.connect("postgresql://" + BROKER_URL.partition("://")[2], autocommit=True)


@app.task(shared=False, name="sessions_app.work", acks_late=True)
def work(key: str, seconds: float = 0.0) -> str:
    with _db() as conn:
        conn.execute(
            "INSERT INTO run_log (name, key, pid, at) VALUES ('work', %s, %s, %s)",
            (key, os.getpid(), time.time()),
        )
    time.sleep(seconds)
    return key


@app.task(shared=False, name="sessions_app.steps", bind=True, base=DurableTask)
def steps(self: Any, key: str) -> list[str]:
    one = self.step("one", lambda: f"{key}-1")
    two = self.step("two", lambda: f"{key}-2")
    return [one, two]
