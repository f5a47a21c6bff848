"""Celery's pytest plugin (``celery.contrib.pytest``) on pgbroker.

Its ``celery_worker`` fixture runs a worker in a thread and stops it by
setting ``celery.worker.state.should_terminate`` from the test's thread,
then waits ``shutdown_timeout`` (10 s) for the thread. The worker's event
loop notices only when it next wakes up; an idle pgbroker consumer used to
wake only for its next sweep (up to ``sweep_interval``, 10 s), so each
teardown took 9-10 s and sometimes hit the timeout (the next test then hung
in ``ensure_started``). Each teardown must now take about as long as on
Redis (about 1 s).

``PGBROKER_PLUGIN_REFERENCE=redis://127.0.0.1:6379/0`` runs the same
measurement on Redis (a queue of its own), the reference.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests import pgserver

pytest_plugins = ("celery.contrib.pytest",)

#: Longest teardown accepted (Redis: about 1 s).
TEARDOWN_BOUND = 2.0
REFERENCE = os.environ.get("PGBROKER_PLUGIN_REFERENCE")
teardowns: list[float] = []


@pytest.fixture(scope="session")
def celery_config(pg_admin_url: str, template_db: str) -> Iterator[dict[str, Any]]:
    queue = f"plugin-{uuid.uuid4().hex[:8]}"
    if REFERENCE:
        yield {"broker_url": REFERENCE, "result_backend": REFERENCE, "task_default_queue": queue}
        return
    name = f"pgbroker_t_{uuid.uuid4().hex[:10]}"
    pgserver.create_database(pg_admin_url, name, template=template_db)
    url = pgserver.url_for(pg_admin_url, name)
    yield {"broker_url": url, "result_backend": url, "task_default_queue": queue}
    pgserver.drop_database(pg_admin_url, name)


@pytest.fixture
def timed_teardown() -> Iterator[dict[str, float]]:
    """Set up before celery_worker, so torn down after it: measures its
    teardown from the moment ``worker_stopping`` (set up after it) ends."""
    marks: dict[str, float] = {}
    yield marks
    took = time.monotonic() - marks["stopping"]
    teardowns.append(took)
    print(f"celery_worker teardown: {took:.2f} s")  # -s shows them
    assert took < TEARDOWN_BOUND, f"celery_worker's teardown took {took:.2f} s"


@pytest.fixture
def worker(timed_teardown: dict[str, float], celery_worker: Any) -> Iterator[Any]:
    yield celery_worker
    timed_teardown["stopping"] = time.monotonic()


@pytest.fixture
def add(celery_app: Any) -> Any:
    @celery_app.task(shared=False, name="plugin.add")
    def add(x: int, y: int) -> int:
        return x + y

    return add


@pytest.mark.parametrize("n", range(5))
def test_round_trip_and_quick_teardown(add: Any, worker: Any, n: int) -> None:
    worker.reload()  # the task was registered after the worker started
    assert add.delay(n, 1).get(timeout=10) == n + 1
