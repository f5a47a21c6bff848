"""The Celery app of the compatibility suite, built the same way for every system.

``make_app(broker, backend, namespace)`` returns an app whose settings do not
depend on the broker: the suite runs pgbroker, Redis and RabbitMQ with exactly
this configuration. Every queue name starts with ``namespace`` (unique per
run), so runs on a shared Redis or RabbitMQ never see each other's tasks.

Tasks take file paths from the suite when they must leave a trace (started,
ran, attempt number): the suite and its workers share the machine, and a file
works the same whatever the broker and backend are.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from kombu import Exchange, Queue

#: Number of extra queues that task_routes sends tasks to.
ROUTED_QUEUES = 10
#: Longest time a blocking task waits for its release file.
BLOCK_TIMEOUT = 20.0


class Names:
    """Queue names of one run."""

    def __init__(self, namespace: str) -> None:
        self.default = namespace
        self.routed = [f"{namespace}.q{i}" for i in range(ROUTED_QUEUES)]
        # Not consumed when the worker starts: tasks wait there (in the broker)
        # until the suite tells the worker to consume them (add_consumer).
        self.priority = f"{namespace}.priority"
        self.expiry = f"{namespace}.expiry"

    def worker_queues(self) -> list[str]:
        return [self.default, *self.routed]

    def all(self) -> list[str]:
        return [*self.worker_queues(), self.priority, self.expiry]


def _queue(name: str, **arguments: Any) -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name, queue_arguments=arguments)


def make_app(broker: str, backend: str, namespace: str) -> Celery:
    names = Names(namespace)
    app = Celery("compat", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(
        task_default_queue=names.default,
        task_default_exchange=names.default,
        task_default_routing_key=names.default,
        task_queues=[
            _queue(names.default),
            *(_queue(name) for name in names.routed),
            # RabbitMQ orders by priority only in a queue declared with
            # x-max-priority; the other transports ignore the argument.
            _queue(names.priority, **{"x-max-priority": 10}),
            _queue(names.expiry),
        ],
        task_routes={f"compat.route{i}": {"queue": q} for i, q in enumerate(names.routed)},
        task_serializer="json",
        result_serializer="json",
        accept_content=["json", "pickle"],
        result_accept_content=["json", "pickle"],
        result_extended=True,
        task_track_started=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        result_expires=600,
        broker_connection_retry_on_startup=True,
    )

    def task(fun: Any, name: str, **options: Any) -> None:
        # shared=False: the suite builds one app per system in one process,
        # and a shared task would be added to every other app as well.
        app.task(name=f"compat.{name}", shared=False, **options)(fun)

    task(add, "add")
    task(mul, "mul")
    task(xsum, "xsum")
    task(identity, "identity")
    task(identity_kwargs, "identity_kwargs")
    task(describe, "describe")
    task(digest, "digest")
    task(fail, "fail")
    task(touch, "touch")
    task(probe, "probe", bind=True)
    for i in range(ROUTED_QUEUES):
        task(probe, f"route{i}", bind=True)
    task(probe, "rate_limited", bind=True, rate_limit="4/s")
    # No rate limit of its own: the suite sets one with control.rate_limit.
    task(probe, "ctl_limited", bind=True)
    task(block, "block", bind=True)
    task(retry_countdown, "retry_countdown", bind=True, max_retries=5)
    task(soft_limited, "soft_limited", soft_time_limit=1, time_limit=10)
    task(hard_limited, "hard_limited", time_limit=1)
    task(lose_worker, "lose_worker", bind=True, acks_late=True, reject_on_worker_lost=True)
    task(progress, "progress", bind=True)
    task(record_error, "record_error")
    task(record_error_id, "record_error_id", bind=True)
    return app


def add(x: int, y: int) -> int:
    return x + y


def mul(x: int, y: int) -> int:
    return x * y


def xsum(values: list[int]) -> int:
    return sum(values)


def identity(value: Any) -> Any:
    return value


def identity_kwargs(**kwargs: Any) -> dict[str, Any]:
    return kwargs


def describe(value: dict[str, Any]) -> dict[str, Any]:
    """Types and a JSON-safe form of a pickled payload (the result is JSON)."""
    return {
        key: [
            type(item).__name__,
            base64.b64encode(item).decode() if isinstance(item, bytes) else repr(item),
        ]
        for key, item in value.items()
    }


def digest(data: str) -> dict[str, Any]:
    return {"len": len(data), "sha256": hashlib.sha256(data.encode()).hexdigest()}


def fail(message: str) -> None:
    raise ValueError(message)


def touch(path: str, text: str = "ran") -> str:
    with open(path, "a") as f:
        f.write(text + "\n")
    return text


def probe(self: Task, label: Any = None, sleep: float = 0.0) -> dict[str, Any]:
    """When, where and from which queue this task ran."""
    started = time.time()
    if sleep:
        time.sleep(sleep)
    info = self.request.delivery_info or {}
    return {
        "label": label,
        "started": started,
        "pid": os.getpid(),
        "hostname": self.request.hostname,
        "routing_key": info.get("routing_key"),
        "exchange": info.get("exchange"),
        "priority": info.get("priority"),
        "redelivered": info.get("redelivered"),
    }


def _wait_for(path: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def block(self: Task, started_path: str, release_path: str, timeout: float = BLOCK_TIMEOUT) -> str:
    """Hold a pool process until ``release_path`` exists (bounded)."""
    _write_atomic(started_path, f"{os.getpid()} {self.request.id}\n")
    return "released" if _wait_for(release_path, timeout) else "timeout"


def retry_countdown(self: Task, path: str, times: int, countdown: float) -> list[float]:
    """Retry ``times`` times with ``countdown``; return the time of each attempt."""
    with open(path, "a") as f:
        f.write(f"{time.time()}\n")
    if self.request.retries < times:
        raise self.retry(countdown=countdown, exc=RuntimeError(f"attempt {self.request.retries}"))
    return [float(line) for line in Path(path).read_text().split()]


def soft_limited() -> str:
    try:
        time.sleep(10)
    except SoftTimeLimitExceeded:
        return "soft limit caught"
    return "not interrupted"


def hard_limited() -> str:
    time.sleep(10)
    return "not interrupted"


def lose_worker(self: Task, path: str) -> dict[str, Any]:
    """SIGKILL its own pool process on the first attempt; succeed on the next."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    pids = [int(line) for line in Path(path).read_text().split()]
    if len(pids) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)  # not reached
    info = self.request.delivery_info or {}
    return {"attempts": len(pids), "pids": pids, "redelivered": info.get("redelivered")}


def progress(self: Task, release_path: str, timeout: float = BLOCK_TIMEOUT) -> str:
    self.update_state(state="PROGRESS", meta={"step": 1, "of": 2, "text": "half ✓"})
    return "done" if _wait_for(release_path, timeout) else "timeout"


def record_error(request: Any, exc: BaseException, traceback: Any, path: str) -> None:
    """A new-style errback: called in the worker with the failed request."""
    record = {
        "task_id": request.id,
        "exc_type": type(exc).__name__,
        "exc": str(exc),
        "has_traceback": bool(traceback),
    }
    _write_atomic(path, json.dumps(record))


def record_error_id(self: Task, task_id: str, path: str) -> None:
    """An old-style errback: sent as a task with the failed task's id."""
    failed = self.app.AsyncResult(task_id)
    record = {"task_id": task_id, "state": failed.state, "exc": repr(failed.result)}
    _write_atomic(path, json.dumps(record))


def _write_atomic(path: str, text: str) -> None:
    # The suite reads the file as soon as it exists: never let it see half.
    tmp = f"{path}.tmp"
    Path(tmp).write_text(text)
    os.replace(tmp, path)
