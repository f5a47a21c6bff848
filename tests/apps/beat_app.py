"""A Celery app for the beat scheduler tests (pgbroker/operations/beat.py).

``record`` writes one row per run into the ``beat_run`` table of the
broker's own database (created by the test), with the slot beat sent it
for, so the test sees duplicates and gaps. The schedule has one entry, a
task every second.
"""

from __future__ import annotations

import os
from typing import Any

import psycopg
from celery import Celery

BROKER_URL = os.environ["TEST_BROKER_URL"]

app = Celery("beat_app")
app.conf.broker_url = BROKER_URL
app.conf.broker_transport_options = {"sweep_interval": 0.5}
app.conf.beat_schedule = {
    "every-second": {
        "task": "tests.apps.beat_app.record",
        "schedule": 1.0,
        "args": ["every-second"],
    }
}
# Short sleeps: runtime changes are seen within a second.
app.conf.beat_max_loop_interval = 1


@app.task(shared=False, bind=True)
def record(self: Any, entry: str) -> None:
    slot = getattr(self.request, "pgbroker_beat_slot", None)
    with psycopg.connect("postgresql://" + BROKER_URL.partition("://")[2], autocommit=True) as c:
        c.execute(
            "INSERT INTO beat_run (entry, slot, task_id) VALUES (%s, %s, %s)",
            (entry, slot, self.request.id),
        )
