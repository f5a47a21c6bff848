"""The dashboard on tasks run by a real Celery worker (prefork) on pgbroker:
the overview sees the worker, its consumer and the sweeper; the Tasks page
finds the tasks by name, state, queue and worker; a task's page shows its
arguments, result or traceback and its canvas; and task data holding
``<script>`` renders as text everywhere."""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("starlette")

from celery import chain, chord
from starlette.testclient import TestClient

from pgbroker.dashboard import create_app
from pgbroker.dashboard.pool import close_all as close_dashboards
from pgbroker.database.pools import close_app, close_pools
from tests.celery_helpers import celery_env, start_worker, wait_until

XSS = "<script>alert(1)</script>"
APP = "tests.apps.results_app"


@pytest.fixture
def worker_app(db_url: str, tmp_path: Path) -> Iterator[ModuleType]:
    """tests/apps/results_app (result_extended on) in this process and in a
    worker, both on the test's database."""
    extra = {"RB_BROKER": db_url, "RB_BACKEND": db_url}
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    sys.modules.pop(APP, None)
    try:
        module = importlib.import_module(APP)
        with start_worker(APP, celery_env(db_url, **extra), tmp_path) as worker:
            worker.wait_for_log("ready.", timeout=60)
            yield module
        close_app(module.app)
    finally:
        sys.modules.pop(APP, None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        close_dashboards()
        close_pools("results")  # before the test's database goes


def test_tasks_of_a_real_worker(worker_app: Any, db_url: str) -> None:
    app = worker_app
    ok = app.identity.delay({"text": XSS, "n": 1})
    bad = app.fail.delay(XSS)
    flow = chain(app.add.s(1, 2), app.add.s(3)).delay()
    fan = chord([app.add.s(i, i) for i in range(3)])(app.xsum.s())
    assert ok.get(timeout=30) == {"text": XSS, "n": 1}
    with pytest.raises(ValueError):
        bad.get(timeout=30, propagate=True)
    assert flow.get(timeout=30) == 6
    assert fan.get(timeout=30) == 6

    with TestClient(create_app(db_url)) as client:
        # The overview: the worker's consumer and host, the sweeper, completions.
        def overview() -> str | None:
            html = client.get("/").text
            return html if "completed (" in html and "No consumer" not in html else None

        html = wait_until(overview, 10, "the overview to show the worker")
        consumers = html.split('<table class="consumers">', 1)[1].split("</table>", 1)[0]
        assert "celery" in consumers and '<span class="alive">yes</span>' in consumers
        completed = re.search(r"completed \((\d+)\)", html)
        assert completed is not None and int(completed.group(1)) >= 8
        assert "pgbroker-sweeper:" in html.split("<h2>Sweeper</h2>", 1)[1]

        # Search: by name, state, worker and queue, as the worker stored them.
        def ids(**query: str) -> set[str]:
            page = client.get("/tasks", params=query).text
            results = page.split("<h2>Results</h2>", 1)[1]
            return set(re.findall(r'<a href="/task\?id=([^"&]+)">', results))

        assert ids(name=f"{APP}.identity") == {ok.id}
        assert ids(name=f"{APP}.fail", state="FAILURE") == {bad.id}
        assert ids(name=f"{APP}.add") >= {flow.id, flow.parent.id}
        worker = client.get("/task", params={"id": ok.id}).text
        host = re.search(r"<dt>worker</dt><dd>([^<]+)</dd>", worker)
        assert host is not None and host.group(1).startswith("worker@")
        assert ok.id in ids(worker=host.group(1), queue="celery")

        # One task: its args and result, escaped.
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in worker
        assert "<script>alert" not in worker
        failed = client.get("/task", params={"id": bad.id}).text
        assert "ValueError" in failed and "Traceback" in failed and "<script>alert" not in failed

        # The chain: the second link's parent is the first.
        second = client.get("/task", params={"id": flow.id}).text
        canvas = second.split("<h2>Canvas</h2>", 1)[1]
        linked = re.findall(r'href="/task\?id=([^"]+)"', canvas.split("</ul>\n<p", 1)[0])
        assert linked[:2] == [flow.parent.id, flow.id]

        # The chord's header: the group's members, each with its state.
        assert fan.parent is not None  # the header's GroupResult
        members = [r.id for r in fan.parent.results]
        page = client.get("/task", params={"id": members[1]}).text
        canvas = page.split("<h2>Canvas</h2>", 1)[1].split("</ul>\n<p", 1)[0]
        shown = re.findall(r'href="/task\?id=([^"]+)"', canvas)
        # The members, and the chord's body under the header part that
        # completed it (Celery's parent_id), all in one group.
        assert set(shown) == {*members, fan.id}
        assert canvas.count(f"group {fan.parent.id}") == 4
