"""A plain Celery app on pgbroker (broker and result backend: ``GREEN_URL``),
for workers with the gevent and eventlet pools."""

from __future__ import annotations

import os

from celery import Celery

app = Celery("green_app")
app.conf.update(
    broker_url=os.environ.get("GREEN_URL", "memory://"),
    result_backend=os.environ.get("GREEN_URL"),
    worker_hijack_root_logger=False,
)


@app.task(shared=False)
def add(x: int, y: int) -> int:
    return x + y
