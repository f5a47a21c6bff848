"""The Celery app of the result backend's end-to-end tests.

Configured by environment variables, so the test and its worker subprocess
build the same app:

``RB_BROKER`` broker URL, ``RB_BACKEND`` result backend URL,
``RB_SERIALIZER`` (json or pickle), ``RB_MAX_RESULT`` (max_result_size),
``RB_EXPIRES`` (result_expires seconds), ``RB_QUEUE`` (the default queue)
and ``RB_REDIS_PREFIX`` (Kombu's ``global_keyprefix`` on a Redis broker).
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

app = Celery("results_app")
_serializer = os.environ.get("RB_SERIALIZER", "json")
_broker = os.environ.get("RB_BROKER", "memory://")
app.conf.update(
    broker_url=_broker,
    result_backend=os.environ.get("RB_BACKEND"),
    result_extended=True,
    task_track_started=True,
    task_serializer=_serializer,
    result_serializer=_serializer,
    accept_content=["json", "pickle"] if _serializer == "pickle" else ["json"],
    result_backend_transport_options={
        "max_result_size": int(os.environ.get("RB_MAX_RESULT", 16 * 1024 * 1024)),
        "cleanup_interval": 0.5,
    },
    result_expires=float(os.environ.get("RB_EXPIRES", 86400)),
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)
if os.environ.get("RB_QUEUE"):
    app.conf.task_default_queue = os.environ["RB_QUEUE"]
if _broker.startswith(("postgresql", "postgres", "pgbroker")):
    app.conf.broker_transport_options = {"sweep_interval": 0.5}
elif os.environ.get("RB_REDIS_PREFIX"):
    # A shared Redis: every key and channel of the test under its own prefix.
    app.conf.broker_transport_options = {"global_keyprefix": os.environ["RB_REDIS_PREFIX"]}


@app.task(shared=False)
def add(x: int, y: int) -> int:
    return x + y


@app.task(shared=False)
def mul(x: int, y: int) -> int:
    return x * y


@app.task(shared=False)
def xsum(values: list[Any]) -> int:
    return sum(_flatten(values))


def _flatten(values: Any) -> list[int]:
    if isinstance(values, (list, tuple)):
        return [v for item in values for v in _flatten(item)]
    return [values]


@app.task(shared=False)
def identity(x: Any) -> Any:
    return x


@app.task(shared=False)
def fail(message: str) -> None:
    raise ValueError(message)


@app.task(shared=False, bind=True, max_retries=5)
def retry_until(self: Any, times: int, countdown: float = 0.1) -> int:
    if self.request.retries < times:
        raise self.retry(countdown=countdown, exc=RuntimeError(f"try {self.request.retries}"))
    return self.request.retries


@app.task(shared=False, bind=True)
def progress(self: Any, flag_path: str) -> str:
    self.update_state(state="PROGRESS", meta={"done": 1, "of": 2})
    deadline = time.monotonic() + 30
    while not os.path.exists(flag_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return "finished"


@app.task(shared=False)
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task(shared=False)
def big(size: int) -> str:
    return "x" * size


@app.task(shared=False, bind=True)
def spawn(self: Any) -> str:
    add.delay(1, 2)
    add.delay(3, 4)
    return "spawned"


@app.task(shared=False, bind=True)
def grow_chord(self: Any, value: int) -> int:
    # Adds one more part to the chord this task belongs to.
    self.add_to_chord(identity.si(100))
    return value


@app.task(shared=False)
def pyobj() -> Any:
    return {1, 2, 3}
