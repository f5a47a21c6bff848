"""Flower, unchanged, against a worker whose broker is pgbroker.

A real ``celery worker -E`` and a real ``celery flower`` subprocess share a
pgbroker database; Flower's HTTP API must list the worker (its ``inspect``
replies travel over pgbroker's pidbox queues) and show a task's events
(received, started, succeeded) as the worker sent them; with
``pgbroker.flower.install()`` in its configuration file, its Broker page and
``/api/queues/length`` show pgbroker's queue lengths.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.celery_helpers import celery_env, client_app, start_worker, started, wait_until

pytest.importorskip("flower")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _api(base: str, path: str) -> Any:
    try:
        with urllib.request.urlopen(base + path, timeout=30) as response:
            return json.loads(response.read().decode())
    except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
        return None


def test_flower_sees_workers_and_task_events(db_url: str, tmp_path: Path) -> None:
    # Flower 2 serves its API only with authentication configured, or with
    # this variable set (fine for a test bound to 127.0.0.1).
    env = celery_env(db_url, FLOWER_UNAUTHENTICATED_API="true")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    # Flower runs its configuration file as Python: the documented two lines.
    conf = tmp_path / "flowerconfig.py"
    conf.write_text("from pgbroker.flower import install\ninstall()\n")
    flower_args = [
        "flower",
        f"--port={port}",
        "--address=127.0.0.1",
        "--persistent=False",
        f"--conf={conf}",
    ]
    with start_worker("tests.apps.basic", env, tmp_path, extra=("-E",)) as worker:
        worker.wait_for_log("ready.", timeout=60)
        with started("flower", "tests.apps.basic", flower_args, env, tmp_path) as flower:
            wait_until(lambda: _healthy(base), 60, "Flower to answer")
            _check_flower(base, db_url)
            log = flower.log()
        assert "Traceback" not in log, log
        assert "Inspect method" not in log, log  # no inspect call failed


def _check_flower(base: str, db_url: str) -> None:
    """Flower's API: the worker, then one task's events."""

    # Workers: found by Flower's inspect broadcast (pidbox over pgbroker).
    def workers() -> dict[str, Any] | None:
        found = _api(base, "/api/workers?refresh=1")
        return found if found and any(k.startswith("worker@") for k in found) else None

    found = wait_until(workers, 60, "Flower to list the worker", interval=1.0)
    [name] = [k for k in found if k.startswith("worker@")]
    info = found[name]
    assert "tests.apps.basic.add" in info["registered"]
    assert {q["name"] for q in info["active_queues"]} >= {"celery"}
    assert info["stats"]["broker"]["transport"] in ("postgresql", "pgbroker.broker.transport")

    # A task's events: sent by the worker, received by Flower's event
    # receiver (celeryev topic exchange over pgbroker).
    with client_app("tests.apps.basic", db_url) as mod:
        result = mod.add.delay(2, 3)
        assert result.get(timeout=60) == 5
        # For the queue lengths below: three tasks that wait in the queue.
        for _ in range(3):
            mod.add.apply_async((1, 1), countdown=3600)
    task_id = result.id

    def task_done() -> dict[str, Any] | None:
        task = _api(base, f"/api/task/info/{task_id}")
        return task if task and task.get("state") == "SUCCESS" else None

    task = wait_until(task_done, 60, "Flower to see the task succeed", interval=0.5)
    assert task["name"] == "tests.apps.basic.add"
    assert task["worker"] == name
    assert task["result"] == "5"
    assert task["received"] and task["started"] and task["succeeded"]
    tasks = _api(base, "/api/tasks")
    assert task_id in tasks
    # The worker is online in Flower's event state (heartbeats arrive).
    dashboard = wait_until(lambda: _api(base, "/api/workers?status=1"), 30, "worker status")
    assert dashboard.get(name) is True

    # Queue lengths (Flower's Broker page, /api/queues/length): the three
    # countdown tasks wait in the worker's queue, as pgbroker counts them.
    def lengths() -> dict[str, Any] | None:
        found = _api(base, "/api/queues/length")
        queues = {q["name"]: q for q in (found or {}).get("active_queues", [])}
        celery = queues.get("celery")
        return celery if celery and celery["messages"] == 3 else None

    celery = wait_until(lengths, 30, "Flower's queue lengths", interval=0.5)
    assert celery["messages_delayed"] == 3
    assert celery["messages_ready"] == 0
    assert celery["consumers"] >= 1
    with urllib.request.urlopen(base + "/broker", timeout=30) as response:
        page = response.read().decode()
    assert 'id="celery"' in page, page
    assert "not supported" not in page


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/healthcheck", timeout=10) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError):
        return False
