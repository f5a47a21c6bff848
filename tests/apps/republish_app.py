"""The Celery app of the republication tests (tests/test_republish.py):
tasks that publish their own task id again, as Task.replace and Task.retry
do. pgbroker is broker and result backend (``TEST_BROKER_URL``)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import task_postrun

BROKER_URL = os.environ["TEST_BROKER_URL"]

app = Celery("republish_app")
app.conf.broker_url = BROKER_URL
app.conf.result_backend = BROKER_URL
app.conf.worker_prefetch_multiplier = 1
app.conf.broker_connection_retry_on_startup = True
app.conf.broker_transport_options = {"sweep_interval": 1.0}
app.conf.task_routes = {"republish_app.replacement": {"queue": "replacements"}}
MARKERS = Path(os.environ.get("TEST_MARKER_DIR", "."))


@app.task(shared=False, name="republish_app.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(shared=False, name="republish_app.replaced", bind=True)
def replaced(self: Any, x: int) -> Any:
    """Replaced by add(x, 1): the replacement keeps this task's id."""
    return self.replace(add.s(x, 1))


@app.task(shared=False, name="republish_app.replaced_twice", bind=True)
def replaced_twice(self: Any, x: int) -> Any:
    """Replaced by ``replaced``, itself replaced by add: the same task id
    published three times, each by another message's run."""
    return self.replace(replaced.s(x))


@app.task(shared=False, name="republish_app.retrying", bind=True, max_retries=None)
def retrying(self: Any, times: int) -> int:
    """Retries with a countdown until it has retried ``times`` times."""
    if self.request.retries < times:
        raise self.retry(countdown=0.2)
    return int(self.request.retries)


@app.task(shared=False, name="republish_app.retry_then_replace", bind=True, max_retries=None)
def retry_then_replace(self: Any) -> Any:
    """Retries once, then is replaced by ``retrying(1)``, which retries with
    the same (task id, retries 1) as this task's own retry did."""
    if self.request.retries < 1:
        raise self.retry(countdown=0.2)
    return self.replace(retrying.s(1))


@app.task(shared=False, name="republish_app.replacement")
def replacement(key: str) -> str:
    """Counts its runs in a file."""
    with (MARKERS / f"replacement-{key}").open("a") as f:
        f.write(f"{os.getpid()}\n")
    return f"{key} replaced"


@app.task(shared=False, name="republish_app.replaced_then_killed", bind=True, acks_late=True)
def replaced_then_killed(self: Any, key: str) -> Any:
    """Replaced by ``replacement``; its worker is SIGKILLed right after the
    replacement was published, before the ack (first delivery only)."""
    return self.replace(replacement.s(key))


@task_postrun.connect
def kill_after_replace(sender: Any = None, **kwargs: Any) -> None:
    if getattr(sender, "name", None) != "republish_app.replaced_then_killed":
        return
    marker = MARKERS / "killed-after-replace"
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    os.killpg(os.getpgrp(), signal.SIGKILL)
