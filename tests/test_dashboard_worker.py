"""The dashboard on tasks run by a real Celery worker (prefork) on pgbroker:
the overview sees the worker, its consumer and the sweeper; the Tasks page
finds the tasks by name, state, queue and worker; a task's page shows its
arguments, result or traceback and its canvas; and task data holding
``<script>`` renders as text everywhere. The actions set a worker going: a
dead letter replayed from the dashboard runs, and an event sent from it
finishes a durable task parked on ``wait_for_event``."""

from __future__ import annotations

import base64
import contextlib
import importlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest
from celery import chain, chord
from starlette.testclient import TestClient

from pgbroker.dashboard import create_app
from pgbroker.dashboard.pool import close_all as close_dashboards
from pgbroker.database.pools import close_app, close_pools
from pgbroker.operations import admin
from tests.celery_helpers import celery_env, client_app, execute, start_worker, wait_until

XSS = "<script>alert(1)</script>"
APP = "tests.apps.results_app"
DURABLE_APP = "tests.apps.durable_waits_app"
TOKEN = "s3cret-token"
ALICE = {"Authorization": "Basic " + base64.b64encode(f"alice:{TOKEN}".encode()).decode()}


@contextlib.contextmanager
def results_app(db_url: str) -> Iterator[ModuleType]:
    """tests/apps/results_app (result_extended on) in this process, on the
    test's database."""
    extra = {"RB_BROKER": db_url, "RB_BACKEND": db_url}
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    sys.modules.pop(APP, None)
    try:
        module = importlib.import_module(APP)
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


def results_worker(db_url: str, tmp_path: Path) -> contextlib.AbstractContextManager[Any]:
    env = celery_env(db_url, RB_BROKER=db_url, RB_BACKEND=db_url)
    return start_worker(APP, env, tmp_path)


@pytest.fixture
def worker_app(db_url: str, tmp_path: Path) -> Iterator[ModuleType]:
    """results_app in this process and in a worker."""
    with results_app(db_url) as module, results_worker(db_url, tmp_path) as worker:
        worker.wait_for_log("ready.", timeout=60)
        yield module


def post_form(client: TestClient, page: str, action: str, **fields: str) -> str:
    """Post ``fields`` to ``action`` with the CSRF token of ``page``'s forms,
    as a browser that opened the page would; the result page's text."""
    html = client.get(page, headers=ALICE).text
    token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', html)
    assert token is not None, html[-1000:]
    done = client.post(action, data={"csrf_token": token.group(1), **fields}, headers=ALICE)
    assert done.status_code == 200, done.text[-1000:]
    return done.text


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

        # Publishes per minute, from the samples the worker's sweeps take
        # (publish_sample): once one is taken, what is published after it
        # shows in the chart, whether or not a page was open.
        def published() -> int:
            found = re.search(r"published \((\d+)\)", client.get("/").text)
            assert found is not None
            return int(found.group(1))

        with psycopg.connect(db_url, autocommit=True) as db:
            sampled = "SELECT count(*) FROM pgbroker.publish_sample"
            wait_until(lambda: (db.execute(sampled).fetchone() or [0])[0], 25, "a sweep's sample")
        before = published()
        assert [app.add.delay(i, i).get(timeout=30) for i in range(5)] == [0, 2, 4, 6, 8]
        wait_until(lambda: published() >= before + 5, 10, "the chart to count 5 more")

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

        # When each run was received and started, which Celery's latest
        # state does not keep: stored with the result, in order, and in the
        # timeline (the chain's first link finished in one transaction with
        # its hand-off; a failure too).
        with psycopg.connect(db_url, autocommit=True) as db:
            for task_id in (ok.id, flow.parent.id, flow.id, bad.id):
                result = admin.show_task(db, "pgbroker", task_id).result
                assert result is not None and result.date_done is not None
                assert result.received_at is not None and result.started_at is not None
                assert result.received_at <= result.started_at <= result.date_done, result
        timeline = worker.split("<h2>Timeline</h2>", 1)[1].split("</table>", 1)[0]
        whats = re.findall(r"<tr><td>[^<]*</td><td>([^<]*)</td>", timeline)
        whats = [w for w in whats if w != "first state stored"]  # (the server's clock)
        assert whats == ["received", "started", "SUCCESS"], whats

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


def test_a_dead_letter_replayed_from_the_dashboard_runs(db_url: str, tmp_path: Path) -> None:
    from tests.test_dashboard import dead_letter_of

    with results_app(db_url) as app:
        lost = app.add.delay(20, 22)
        execute(db_url, "SELECT 1")  # the message is committed
        with psycopg_conn(db_url) as db:
            dead_letter_of(db, lost.id, "rejected")
        with (
            results_worker(db_url, tmp_path) as worker,
            TestClient(create_app(db_url, actions=True, token=TOKEN)) as client,
        ):
            worker.wait_for_log("ready.", timeout=60)
            html = client.get("/dead-letters", headers=ALICE).text
            letter = re.search(r'href="/dead-letter\?id=(\d+)"', html)
            assert letter is not None and lost.id in html
            done = post_form(
                client, "/dead-letters", "/dead-letters/replay", id=letter.group(1), task_id=lost.id
            )
            assert "Replayed 1" in done
            assert lost.get(timeout=30) == 42
            task = client.get("/task", params={"id": lost.id}, headers=ALICE).text
            assert "state-SUCCESS" in task, task[-1500:]


def test_an_event_sent_from_the_dashboard_finishes_a_parked_task(
    db_url: str, tmp_path: Path
) -> None:
    execute(db_url, "CREATE TABLE effect (id serial, key text, step text, pid int)")
    with (
        client_app(DURABLE_APP, db_url) as tasks,
        start_worker(DURABLE_APP, celery_env(db_url), tmp_path, "w", ("--concurrency=1",)) as w,
        TestClient(create_app(db_url, actions=True, token=TOKEN)) as client,
    ):
        w.wait_for_log("ready.", timeout=60)
        flow = tasks.approval_flow.delay(61)
        wait_until(
            lambda: flow.id in client.get("/durable", headers=ALICE).text,
            30,
            "the flow to show as waiting",
        )
        w.wait_for_log(f"approval_flow[{flow.id}]: waiting for event 'approval:61'")
        waiting = client.get("/durable", headers=ALICE).text
        assert 'name="event" value="approval:61"' in waiting
        done = post_form(
            client, "/durable", "/durable/event", event="approval:61", payload='{"approved": true}'
        )
        assert "1 woken now" in done and flow.id in done
        value = flow.get(timeout=30)
        assert value["answer"] == {"approved": True}
        page = client.get("/durable", headers=ALICE).text
        waits = page.split("<h2>Waiting</h2>", 1)[1].split("<h2>", 1)[0]
        assert flow.id not in waits
    close_dashboards()


@contextlib.contextmanager
def psycopg_conn(db_url: str) -> Iterator[Any]:
    import psycopg

    with psycopg.connect("postgresql://" + db_url.partition("://")[2], autocommit=True) as conn:
        yield conn
