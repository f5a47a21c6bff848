"""A stock Celery app for the integration tests.

Configured only by its broker URL, read from the environment the test sets.
There is no ``import pgbroker`` here: the URL scheme reaches pgbroker through
the installed ``pgbroker-autoload.pth``, exactly as in a user's project.
"""

from __future__ import annotations

import os
import time

from celery import Celery

app = Celery("basic")
app.conf.broker_url = os.environ["TEST_BROKER_URL"]
# Results travel back over the broker, in a reply queue per client.
app.conf.result_backend = "rpc://"
# Used only by `celery beat`: a task every second.
app.conf.beat_schedule = {"tick": {"task": "tests.apps.basic.tick", "schedule": 1.0}}


@app.task(shared=False)
def add(x: int, y: int) -> int:
    return x + y


@app.task(shared=False)
def mul(x: int, y: int) -> int:
    return x * y


@app.task(shared=False)
def worker_pid() -> int:
    return os.getpid()


@app.task(shared=False)
def slow(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task(shared=False)
def tick() -> str:
    return "tock"
