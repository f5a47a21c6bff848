"""The app of tests/test_migrate_from_redis.py: one task that logs its call.

Configured from the environment: ``TEST_BROKER_URL`` (Redis before the
switch, PostgreSQL after), ``TEST_RESULT_URL`` (the result backend, switched
to PostgreSQL first) and ``TEST_QUEUE`` (a queue name unique to the test).
Each execution appends a row to ``migrate_log`` in the result database, in
execution order, so the test can check exactly-once, arguments and order.
"""

from __future__ import annotations

import json
import os

import psycopg
from celery import Celery

app = Celery("redis_migrate")
app.conf.broker_url = os.environ["TEST_BROKER_URL"]
app.conf.result_backend = os.environ["TEST_RESULT_URL"]
app.conf.task_default_queue = os.environ["TEST_QUEUE"]
# One task at a time, so that execution order is service order.
app.conf.worker_prefetch_multiplier = 1


def log_url() -> str:
    return "postgresql://" + os.environ["TEST_RESULT_URL"].partition("://")[2]


@app.task(shared=False, bind=True)
def record(self, *args, **kwargs):
    with psycopg.connect(log_url()) as conn:
        conn.execute(
            "INSERT INTO migrate_log (task_id, args, kwargs, priority) VALUES (%s, %s, %s, %s)",
            [
                self.request.id,
                json.dumps(args),
                json.dumps(kwargs),
                (self.request.delivery_info or {}).get("priority"),
            ],
        )
    return [list(args), kwargs]
