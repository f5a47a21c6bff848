"""The web dashboard's pages (pgbroker.dashboard), through Starlette's test
client, on a real database whose results are stored by pgbroker's result
backend (real Celery tasks run by a worker: tests/test_dashboard_worker.py).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import traceback
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from celery import Celery
from celery.schedules import crontab
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from pgbroker.dashboard import create_app
from pgbroker.dashboard.pool import close_all as close_dashboards
from pgbroker.database.pools import close_app, close_pools
from pgbroker.errors import ConfigurationError
from tests import kombu_helpers as kh
from tests.celery_helpers import wait_until, with_password
from tests.test_cli_ops import _request as _cli_request
from tests.test_cli_ops import run as run_cli

XSS = "<script>alert(1)</script>"


@pytest.fixture(autouse=True)
def _close_dashboard_pools() -> Iterator[None]:
    yield
    close_dashboards()


@pytest.fixture
def client(db_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(db_url)) as c:
        yield c


@pytest.fixture
def celery_app(db_url: str) -> Iterator[Celery]:
    app = Celery("dash", broker=db_url, backend=db_url, set_as_current=False)
    app.conf.result_extended = True
    app.conf.broker_transport_options = kh.FAST
    yield app
    close_app(app)
    close_pools("results")  # before the test's database goes


# A result's request, as the CLI's task tests build it.
request = _cli_request


def fail(backend: Any, task_id: str, name: str, message: str, **kw: Any) -> None:
    try:
        raise ValueError(message)
    except ValueError as exc:
        backend.mark_as_failure(
            task_id, exc, traceback.format_exc(), request=request(task_id, name, **kw)
        )


def ids_in(html: str) -> list[str]:
    """The task ids of the Results table, in order."""
    table = html.split("<h2>Results</h2>", 1)[1]
    return re.findall(r'<td class="id"><a href="/task\?id=[^"]*">([^<]*)</a>', table)


# --- the app and the command -----------------------------------------------------


def test_overview_shows_queues_consumers_and_the_chart(
    client: TestClient, celery_app: Celery, db_url: str
) -> None:
    # Publishes are counted from the samples sweeps take (publish_sample):
    # none yet, so none known.
    assert "published (0)" in client.get("/").text
    with kh.connect(db_url, fast_recovery=False, sweep_interval=3600.0) as conn:
        conn.transport.sweep()  # as a worker's sweep does: this minute's sample
    celery_app.send_task("billing.charge", args=[1], queue="billing")
    celery_app.send_task("billing.charge", args=[2], queue="billing")
    celery_app.backend.mark_as_done("t1", 3, request=request("t1", "billing.add"))
    page = client.get("/")
    assert page.status_code == 200
    html = page.text
    queues = html.split('<table class="queues">', 1)[1].split("</table>", 1)[0]
    row = re.search(r"<tr>\s*<td><a [^>]*>billing</a></td>(.*?)</tr>", queues, re.S)
    assert row is not None, queues
    counts = re.findall(r'<td class="num">([^<]*)</td>', row.group(1))
    # ready, reserved, delayed, dead letters, oldest ready, consumers
    assert counts[:4] == ["2", "0", "0", "0"] and counts[5] == "0"
    assert re.fullmatch(r"\d+s", counts[4])
    assert '<svg class="chart"' in html
    # Two published, one completed this minute: the legend's totals.
    assert "published (2)" in html and "completed (1)" in html
    assert "No consumer" in html
    # The live part polls its partial, which is the same block alone.
    assert 'hx-get="/partials/overview"' in html and 'hx-trigger="every 5.0s"' in html
    part = client.get("/partials/overview")
    assert part.status_code == 200
    assert part.text.lstrip().startswith('<div id="live"')
    assert "<html" not in part.text and "billing" in part.text
    # htmx comes from the package, not a CDN.
    assert '<script src="/static/htmx.min.js"' in html and "https://" not in html
    js = client.get("/static/htmx.min.js")
    assert js.status_code == 200 and "htmx" in js.text[:200]


def test_every_response_carries_the_security_headers(client: TestClient) -> None:
    for path in ("/", "/tasks", "/static/dashboard.css", "/task?id=nope"):
        headers = client.get(path).headers
        assert "script-src 'self'" in headers["content-security-policy"], path
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"


def test_the_password_never_shows(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    url, password = with_password(db_url)
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(url)) as c:
        bodies = [c.get(p).text for p in ("/", "/tasks", "/task?id=missing")]
    assert "**" in bodies[0]  # the database is named, its password masked
    # A database that is not there: the error page names it, not the password.
    wrong = url.rsplit("/", 1)[0] + "/no_such_database_here"
    close_dashboards()
    with TestClient(create_app(wrong), raise_server_exceptions=False) as c:
        error = c.get("/")
    assert error.status_code == 503
    assert "no_such_database_here" in error.text
    bodies.append(error.text)
    for body in bodies:
        assert password not in body
    assert password not in caplog.text


def test_actions_need_a_token(db_url: str) -> None:
    with pytest.raises(ConfigurationError, match="need authentication"):
        create_app(db_url, actions=True)
    with pytest.raises(ConfigurationError, match="unsupported URL"):
        create_app("http://u:pw@h/db")


def test_a_token_guards_every_path(db_url: str) -> None:
    app = create_app(db_url, token="s3cret-token")
    with TestClient(app) as c:
        for path in ("/", "/tasks", "/static/htmx.min.js", "/partials/overview"):
            denied = c.get(path)
            assert denied.status_code == 401, path
            assert denied.headers["www-authenticate"].startswith("Basic")
        assert c.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        basic = base64.b64encode(b"alice:s3cret-token").decode()
        page = c.get("/", headers={"Authorization": f"Basic {basic}"})
        assert page.status_code == 200 and "signed in as alice" in page.text
        wrong = base64.b64encode(b"alice:nope").decode()
        assert c.get("/", headers={"Authorization": f"Basic {wrong}"}).status_code == 401


def test_mounted_under_a_prefix_links_stay_inside(db_url: str, celery_app: Celery) -> None:
    celery_app.backend.mark_as_done("m1", 1, request=request("m1", "a.b"))
    outer = Starlette(routes=[Mount("/pgbroker", app=create_app(db_url))])
    with TestClient(outer) as c:
        html = c.get("/pgbroker/tasks").text
        assert 'href="/pgbroker/task?id=m1"' in html
        assert 'src="/pgbroker/static/htmx.min.js"' in html
        assert c.get("/pgbroker/static/dashboard.css").status_code == 200
        assert c.get("/pgbroker/task?id=m1").status_code == 200
        overview = c.get("/pgbroker/").text
        assert 'hx-get="/pgbroker/partials/overview"' in overview


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_the_command_serves_and_prints_the_address(db_url: str) -> None:
    url, password = with_password(db_url)
    port = _free_port()
    env = dict(os.environ, PGBROKER_URL=url)
    env.pop("PGBROKER_DASHBOARD_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgbroker", "dashboard", "--port", str(port)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(f"pgbroker dashboard: http://127.0.0.1:{port}/ "), line
        assert "**" in line and password not in line

        def answers() -> str | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    body: str = r.read().decode()
                    return body
            except OSError:
                return None

        body = wait_until(answers, 20, "the dashboard to answer")
        assert "<h1>Overview</h1>" in body and password not in body
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert password not in out + err


def test_the_command_fails_early_and_clearly(db_url: str, empty_db_url: str) -> None:
    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PGBROKER_")}
        return subprocess.run(
            [sys.executable, "-m", "pgbroker", "dashboard", *args],
            env={**environ, **env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )

    missing = run()
    assert missing.returncode == 2 and "no database URL" in missing.stderr
    url, password = with_password(empty_db_url)
    unmigrated = run("--url", url, "--port", str(_free_port()))
    assert unmigrated.returncode == 2 and "pgbroker migrate" in unmigrated.stderr
    assert password not in unmigrated.stderr
    no_token = run("--url", db_url, "--actions")
    assert no_token.returncode == 2 and "need authentication" in no_token.stderr
    assert run("--url", db_url, "--port", "0").returncode == 2
    helped = run("--help")
    assert "PGBROKER_DASHBOARD_TOKEN" in helped.stdout and "PGBROKER_URL" in helped.stdout


# --- tasks -----------------------------------------------------------------------


def test_tasks_search_filters(
    client: TestClient, celery_app: Celery, db: psycopg.Connection
) -> None:
    backend = celery_app.backend
    backend.mark_as_done("ok-1", 3, request=request("ok-1", "billing.add"))
    fail(backend, "fail-1", "billing.charge", "card declined")
    backend.store_result(
        "run-1",
        {"pid": 1},
        "STARTED",
        request=request(
            "run-1", "mail.send", hostname="w2@host", delivery_info={"routing_key": "mail"}
        ),
    )
    backend.mark_as_done("old-1", 0, request=request("old-1", "billing.add"))
    db.execute(
        "UPDATE pgbroker.task_result SET updated_at = now() - interval '3 hours' "
        "WHERE task_id = 'old-1'"
    )
    celery_app.send_task("billing.refund", args=[5], task_id="queued-1", queue="billing")

    def ids(**query: str) -> list[str]:
        page = client.get("/tasks", params=query)
        assert page.status_code == 200, page.text
        return ids_in(page.text)

    assert ids()[-1] == "old-1" and sorted(ids()) == ["fail-1", "ok-1", "old-1", "run-1"]
    assert ids(state="failure") == ["fail-1"]
    assert sorted(ids(name="billing.*")) == ["fail-1", "ok-1", "old-1"]
    assert sorted(ids(name="billing.add")) == ["ok-1", "old-1"]
    assert ids(name="billing_add") == []
    assert ids(queue="mail") == ["run-1"]
    assert ids(worker="w2@host") == ["run-1"]
    assert ids(task_id="ok-1") == ["ok-1"]
    recent = db.execute("SELECT (now() - interval '1 hour')::timestamp(0)::text").fetchone()
    assert recent is not None
    since = recent[0].replace(" ", "T")
    assert "old-1" not in ids(since=since) and len(ids(since=since)) == 3
    assert ids(until=since) == ["old-1"]
    # A bad time is said, not a 500.
    bad = client.get("/tasks", params={"since": "yesterday"})
    assert bad.status_code == 200 and "is not a time" in bad.text
    # The queued task has no result yet: listed as in flight.
    html = client.get("/tasks", params={"name": "billing.*"}).text
    assert "In flight" in html and "queued-1" in html.split("<h2>Results</h2>")[0]
    assert "result_extended=True" in html


def test_tasks_are_paged_by_keyset(
    client: TestClient, celery_app: Celery, db: psycopg.Connection
) -> None:
    # 120 results, three sharing one updated_at: the task id breaks the tie.
    db.execute(
        "INSERT INTO pgbroker.task_result (task_id, state, name, content_type, "
        "content_encoding, updated_at) "
        "SELECT 'id-' || lpad(i::text, 3, '0'), 'SUCCESS', 'x.y', 'application/json', "
        "'utf-8', timestamptz '2026-01-01' + (CASE WHEN i <= 3 THEN 0 ELSE i END) * interval '1 s' "
        "FROM generate_series(1, 120) i"
    )
    seen: list[str] = []
    query: dict[str, str] = {"name": "x.y"}
    pages = 0
    while True:
        html = client.get("/tasks", params=query).text
        seen += ids_in(html)
        pages += 1
        link = re.search(r'<a rel="next" href="/tasks\?([^"]+)"', html)
        if not link:
            break
        query = dict(
            (k, v)
            for k, v in (
                pair.split("=", 1) for pair in link.group(1).replace("&amp;", "&").split("&")
            )
        )
        from urllib.parse import unquote_plus

        query = {k: unquote_plus(v) for k, v in query.items()}
        assert query["name"] == "x.y"
    assert pages == 3
    expected = [f"id-{i:03d}" for i in range(120, 3, -1)] + ["id-003", "id-002", "id-001"]
    assert seen == expected
    assert "« newest" in html


# --- one task --------------------------------------------------------------------


def test_task_page_shows_the_record_and_cuts_large_values(
    client: TestClient, celery_app: Celery, db: psycopg.Connection
) -> None:
    backend = celery_app.backend
    big = "x" * 10_000
    backend.mark_as_done("big-1", big, request=request("big-1", "big.task", args=["arg"]))
    fail(backend, "fail-1", "billing.charge", "card declined")
    html = client.get("/task", params={"id": "big-1"}).text
    assert "big.task" in html and "SUCCESS" in html and "w1@host" in html
    assert "x" * 2000 in html and "x" * 2001 not in html
    assert "of 10000 characters" in html
    assert 'href="/task/value?id=big-1&amp;field=result"' in html
    whole = client.get("/task/value", params={"id": "big-1", "field": "result"})
    assert whole.status_code == 200 and whole.headers["content-type"].startswith("text/plain")
    assert whole.text == big
    failed = client.get("/task", params={"id": "fail-1"}).text
    assert "ValueError" in failed and "card declined" in failed
    assert "Traceback (most recent call last)" in failed
    assert client.get("/task", params={"id": "nope"}).status_code == 404
    assert client.get("/task/value", params={"id": "big-1", "field": "nope"}).status_code == 404


def test_task_page_shows_redeliveries_dead_letters_and_durable_steps(
    client: TestClient, celery_app: Celery, db: psycopg.Connection
) -> None:
    celery_app.send_task("billing.void", task_id="dead-1", queue="billing")
    db.execute(
        "INSERT INTO pgbroker.redelivery (reason, message_id, queue, task_id, consumer_id, "
        "delivery_count) VALUES ('consumer died', 1, 'billing', 'dead-1', 9, 1)"
    )
    db.execute(
        "WITH m AS (DELETE FROM pgbroker.message WHERE task_id = 'dead-1' RETURNING *) "
        "INSERT INTO pgbroker.dead_letter (reason, queue, delivery_count, published_at, "
        "exchange, routing_key, task_id, task_name, priority, content_type, "
        "content_encoding, headers, properties, body) "
        "SELECT 'max deliveries', queue, 3, published_at, exchange, routing_key, task_id, "
        "task_name, priority, content_type, content_encoding, headers, properties, body FROM m"
    )
    html = client.get("/task", params={"id": "dead-1"}).text
    timeline = html.split("<h2>Timeline</h2>", 1)[1].split("</table>", 1)[0]
    assert "redelivered" in timeline and "consumer died" in timeline
    assert "dead-lettered" in timeline and "max deliveries" in timeline
    assert "no result stored yet" in html

    # A durable task's steps, waits and run, as DurableTask writes them; its
    # result is not stored (yet, or in another backend) and its message is acked.
    db.execute(
        "INSERT INTO pgbroker.durable_step (task_id, step_index, name, task_name, state, "
        "output, content_type, content_encoding, attempts) VALUES "
        "('dur-1', 0, 'charge', 'flow', 'done', convert_to('{\"paid\": 12}', 'utf8'), "
        "'application/json', 'utf-8', 2), "
        "('dur-1', 1, 'ship', 'flow', 'failed', NULL, NULL, NULL, 3)"
    )
    db.execute("UPDATE pgbroker.durable_step SET error = 'TimeoutError()' WHERE step_index = 1")
    db.execute(
        "INSERT INTO pgbroker.durable_wait (task_id, step_index, task_name, kind, name, "
        "deadline) VALUES ('dur-1', 2, 'flow', 'event', 'approved', now() + interval '1 day')"
    )
    db.execute(
        "INSERT INTO pgbroker.durable_run (task_id, run_id, task_name, hostname, pid, "
        "exclusive_key) VALUES ('dur-1', gen_random_uuid(), 'flow', 'h1', 42, 'order-7')"
    )
    page = client.get("/task", params={"id": "dur-1"})
    html = page.text
    assert page.status_code == 200 and "<h2>Durable steps</h2>" in html, html
    steps = html.split("<h2>Durable steps</h2>", 1)[1]
    assert "charge" in steps and "{\n  &#34;paid&#34;: 12\n}" in steps
    assert "TimeoutError()" in steps
    assert "approved" in steps and "waiting" in steps
    assert "order-7" in html  # the exclusive key
    assert "<dt>name</dt><dd>flow</dd>" in html and "no result stored yet" in html
    celery_app.backend.store_result("dur-1", None, "STARTED", request=request("dur-1", "flow"))
    db.execute(
        "INSERT INTO pgbroker.durable_event (name, payload, content_type, content_encoding) "
        "VALUES ('approved', NULL, 'application/json', 'utf-8')"
    )
    assert "event sent" in client.get("/task", params={"id": "dur-1"}).text


def test_canvas_links_parent_children_and_group(client: TestClient, celery_app: Celery) -> None:
    b = celery_app.backend
    b.mark_as_done("root", 1, request=request("root", "wf.start"))
    b.mark_as_done(
        "child", 2, request=request("child", "wf.next", parent_id="root", root_id="root")
    )
    for i in range(3):
        b.mark_as_done(
            f"member-{i}",
            i,
            request=request(
                f"member-{i}", "wf.part", parent_id="child", root_id="root", group="g1"
            ),
        )
    html = client.get("/task", params={"id": "member-1"}).text
    canvas = html.split("<h2>Canvas</h2>", 1)[1].split("</ul>\n<p", 1)[0]
    order = re.findall(r'href="/task\?id=([^"]+)"', canvas)
    assert order == ["root", "child", "member-0", "member-1", "member-2"]
    assert canvas.count("group g1") == 3
    assert '<li class="me">' in canvas


# --- escaping --------------------------------------------------------------------


@pytest.mark.parametrize("actions", [False, True], ids=["read-only", "actions"])
def test_task_data_is_escaped_on_every_page(
    actions: bool, celery_app: Celery, db: psycopg.Connection, db_url: str
) -> None:
    """With actions on too: the forms carry task data in their fields, and
    the actions' own pages repeat what they acted on."""
    from pgbroker.dashboard import csrf
    from pgbroker.operations import beat

    app = create_app(db_url, actions=True, token="tok") if actions else create_app(db_url)
    client = TestClient(app, headers={"Authorization": "Bearer tok"} if actions else {})
    b = celery_app.backend
    b.mark_as_done(XSS, XSS, request=request(XSS, XSS, args=[XSS], kwargs={XSS: XSS}, hostname=XSS))
    fail(b, "f-1", XSS, XSS, parent_id=XSS, root_id=XSS, group=XSS)
    celery_app.send_task(XSS, args=[XSS], queue="q", task_id="queued-xss")
    celery_app.send_task(XSS, args=[XSS], queue=XSS, task_id="dead-xss")
    dead_letter_of(db, "dead-xss", XSS)
    db.execute(
        "INSERT INTO pgbroker.redelivery (reason, message_id, queue, task_id, delivery_count) "
        "VALUES (%s, 1, %s, %s, 1)",
        [XSS, XSS, XSS],
    )
    db.execute(
        "INSERT INTO pgbroker.durable_wait (task_id, step_index, task_name, kind, name) "
        "VALUES (%s, 0, %s, 'event', %s)",
        [XSS, XSS, XSS],
    )
    db.execute(
        "INSERT INTO pgbroker.durable_step (task_id, step_index, name, task_name, state, "
        "output, content_type, content_encoding) VALUES (%s, 0, %s, %s, 'done', %s, "
        "'application/json', 'utf-8')",
        [XSS, XSS, XSS, json.dumps(XSS).encode()],
    )
    beat.add_entry(db_url, XSS, XSS, 60, args=[XSS])
    dead_id = db.execute("SELECT max(id) FROM pgbroker.dead_letter").fetchone()
    assert dead_id is not None
    pages = [
        client.get("/"),
        client.get("/partials/overview"),
        client.get("/tasks"),
        client.get("/tasks", params={"name": XSS}),
        client.get("/task", params={"id": XSS}),
        client.get("/task", params={"id": "f-1"}),
        client.get("/task", params={"id": "queued-xss"}),
        client.get("/task", params={"id": XSS + "-missing"}),
        client.get("/tasks", params={"since": XSS}),
        client.get("/dead-letters", params={"queue": XSS, "reason": XSS}),
        client.get("/redeliveries", params={"reason": XSS}),
        client.get("/durable"),
        client.get("/beat"),
        client.get("/dead-letters"),
        client.get("/dead-letter", params={"id": dead_id[0]}),
        client.get("/redeliveries"),
        client.get("/redeliveries", params={"reason": XSS}),
    ]
    if actions:
        form = {"csrf_token": csrf.token_for(app.state.dashboard.csrf_secret, "token")}
        done = [
            client.post("/durable/event", data={**form, "event": XSS, "payload": json.dumps(XSS)}),
            client.post("/beat/disable", data={**form, "entry": XSS}),
            client.post("/dead-letters/replay", data={**form, "all": "1", "queue": XSS}),
            client.post("/beat/enable", data={**form, "entry": XSS + "-missing"}),
        ]
        assert [p.status_code for p in done] == [200, 200, 200, 404]
        pages += done
    for page in pages:
        assert "<script>alert" not in page.text, page.url
        # Each page shows the value (escaped), in its data or its filters.
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text, page.url
    shown = "".join(p.text for p in pages)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in shown
    assert shown.count("&lt;script&gt;") > 30
    # The whole value is plain text, never HTML.
    whole = client.get("/task/value", params={"id": XSS, "field": "args"})
    assert whole.headers["content-type"].startswith("text/plain")
    assert whole.headers["x-content-type-options"] == "nosniff"


# --- the publish samples -----------------------------------------------------------


def test_publish_rate_from_the_samples_sweeps_take(db_url: str, db: psycopg.Connection) -> None:
    from pgbroker.dashboard import data

    def samples() -> int:
        return int(kh.scalar(db, "SELECT count(*) FROM pgbroker.publish_sample"))

    def minute() -> Any:
        return kh.scalar(db, "SELECT date_trunc('minute', now())")

    with kh.connect(db_url, fast_recovery=False, sweep_interval=3600.0) as conn:
        first = minute()
        conn.transport.sweep()
        conn.transport.sweep()
        # One sample a minute, whoever sweeps: the second sweep adds none
        # (two if the sweeps fell on either side of a minute's start).
        assert samples() == (1 if minute() == first else 2)
        # A sample older than a day goes at the next sweep; a younger one stays.
        db.execute("DELETE FROM pgbroker.publish_sample")
        db.execute(
            "INSERT INTO pgbroker.publish_sample VALUES "
            "(date_trunc('minute', now()) - interval '25 hours', now(), 1), "
            "(date_trunc('minute', now()) - interval '23 hours', now(), 1)"
        )
        conn.transport.sweep()
        assert samples() == 2
        assert kh.scalar(db, "SELECT min(minute) FROM pgbroker.publish_sample") > kh.scalar(
            db, "SELECT now() - interval '1 day'"
        )

    # A worker whose role was granted the tables before migration 017, and
    # not the message id sequence (an identity column needs no grant to
    # insert), still sweeps and samples: sample_publishes runs as its owner.
    import uuid
    from urllib.parse import urlsplit, urlunsplit

    role = f"pgb_old_grant_{uuid.uuid4().hex[:8]}"
    db.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        db.execute(f'GRANT USAGE ON SCHEMA pgbroker TO "{role}"')
        db.execute(
            f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgbroker TO "{role}"'
        )
        db.execute(f'REVOKE ALL ON pgbroker.publish_sample FROM "{role}"')
        db.execute("DELETE FROM pgbroker.publish_sample")
        parts = urlsplit(db_url)
        url = urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rpartition('@')[2]}"))
        with kh.connect(url, fast_recovery=False, sweep_interval=3600.0) as conn:
            conn.transport.sweep()
        assert samples() == 1
    finally:
        close_pools()
        db.execute(f'DROP OWNED BY "{role}"')
        db.execute(f'DROP ROLE "{role}"')

    # The chart's minutes, from samples written here against the sequence as
    # it stands (nothing publishes meanwhile); one transaction, so that now()
    # is one time throughout. A minute counts from its sample to the next.
    stored = kh.scalar(
        db,
        "SELECT coalesce(pg_sequence_last_value("
        "pg_get_serial_sequence('pgbroker.message', 'id')::regclass), 0)",
    )
    insert = (
        "INSERT INTO pgbroker.publish_sample (minute, sampled_at, stored_total) "
        "VALUES (date_trunc('minute', now()) - make_interval(mins => %s), now(), %s)"
    )
    with db.transaction():
        db.execute("DELETE FROM pgbroker.publish_sample")
        for ago, behind in [(30, 100), (29, 90), (28, 60), (10, 20), (0, 4)]:
            db.execute(insert, (ago, stored - behind))
        published = [m.published for m in data.throughput(db, "pgbroker")]
        assert len(published) == 60  # the last is the current minute
        assert published[59 - 30] == 10 and published[59 - 29] == 30
        assert published[59 - 28] is None  # the next minute has no sample: unknown
        assert published[59 - 10] is None
        assert published[59] == 4  # the current minute: to the sequence now
        assert [i for i, n in enumerate(published) if n is not None] == [29, 30, 59]
        # No sample yet in the current minute: the last one counts to now.
        db.execute("DELETE FROM pgbroker.publish_sample WHERE minute = date_trunc('minute', now())")
        db.execute(insert, (1, stored - 7))
        published = [m.published for m in data.throughput(db, "pgbroker")]
        assert published[58] == 7 and published[59] is None
        db.execute("DELETE FROM pgbroker.publish_sample")


def test_the_retry_log_keeps_the_last_fifty_and_cuts_long_reasons(
    celery_app: Celery, db: psycopg.Connection, db_url: str
) -> None:
    backend = celery_app.backend
    for i in range(54):
        backend.mark_as_retry("t-r", RuntimeError(f"try {i}"), request=request("t-r", "x.y"))
    backend.mark_as_retry("t-r", RuntimeError("x" * 1000 + "\0"), request=request("t-r", "x.y"))
    backend.mark_as_done("t-r", 1, request=request("t-r", "x.y"))
    log = kh.scalar(db, "SELECT retry_log FROM pgbroker.task_result WHERE task_id = 't-r'")
    reasons = [e["reason"] for e in log]
    assert reasons[:-1] == [f"RuntimeError: try {i}" for i in range(5, 54)]
    assert len(reasons[-1]) == 500 and reasons[-1].endswith("x…")
    # pgbroker show lists them.
    shown = run_cli("tasks", "show", "t-r", "--url", db_url).stdout
    assert "retried:" in shown and "run 50: RuntimeError: xxx" in shown, shown


# --- dead letters, redeliveries, beat, durable runs ----------------------------------


def dead_letter_of(db: psycopg.Connection, task_id: str, reason: str) -> None:
    """Move a task's message to dead_letter, as the transport does."""
    db.execute(
        "WITH m AS (DELETE FROM pgbroker.message WHERE task_id = %s RETURNING *) "
        "INSERT INTO pgbroker.dead_letter (reason, queue, delivery_count, published_at, "
        "exchange, routing_key, task_id, task_name, priority, content_type, "
        "content_encoding, headers, properties, body) "
        "SELECT %s, queue, 1, published_at, exchange, routing_key, task_id, "
        "task_name, priority, content_type, content_encoding, headers, properties, body FROM m",
        [task_id, reason],
    )


def test_dead_letters_list_filter_and_inspect(
    client: TestClient, celery_app: Celery, db: psycopg.Connection
) -> None:
    celery_app.send_task("billing.void", args=[XSS], task_id="dl-1", queue="billing")
    celery_app.send_task("mail.send", args=[2], task_id="dl-2", queue="mail")
    dead_letter_of(db, "dl-1", "rejected")
    dead_letter_of(db, "dl-2", "max deliveries")
    html = client.get("/dead-letters").text
    assert "dl-1" in html and "dl-2" in html and "2 match" in html
    assert "rejected (1)" in html  # the reason filter's choices
    only = client.get("/dead-letters", params={"reason": "rejected"}).text
    assert "dl-1" in only and "dl-2" not in only
    assert "dl-2" in client.get("/dead-letters", params={"queue": "mail"}).text
    ids = re.findall(r'href="/dead-letter\?id=(\d+)"', only)
    page = client.get("/dead-letter", params={"id": ids[0]}).text
    assert "billing.void" in page and "rejected" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the body's args, decoded
    assert client.get("/dead-letter", params={"id": "999999"}).status_code == 404


def test_redeliveries_grouped_by_reason(client: TestClient, db: psycopg.Connection) -> None:
    db.execute(
        "INSERT INTO pgbroker.redelivery (at, reason, message_id, queue, task_id, consumer_id, "
        "delivery_count) VALUES "
        "(now(), 'consumer died', 1, 'celery', 't-1', 3, 1), "
        "(now(), 'consumer died', 2, 'celery', 't-2', 3, 1), "
        "(now() - interval '2 hours', 'consumer died', 3, 'celery', 't-3', 4, 2), "
        "(now() - interval '3 days', 'requeued', 4, 'mail', 't-4', NULL, 1)"
    )
    html = client.get("/redeliveries").text
    reasons = html.split('<table class="reasons">', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r'reason=([^"]+)">[^<]+</a></td>\s*((?:<td class="num">\d+</td>)+)', reasons)
    counts = {r: re.findall(r">(\d+)<", cells) for r, cells in rows}
    assert counts == {"consumer%20died": ["2", "3", "3"], "requeued": ["0", "0", "1"]}
    only = client.get("/redeliveries", params={"reason": "requeued"}).text
    newest = only.split('<table class="redeliveries">', 1)[1]
    assert "t-4" in newest and "t-1" not in newest


def test_beat_schedule(client: TestClient, db_url: str) -> None:
    from pgbroker.operations import beat

    beat.add_entry(db_url, "every-minute", "reports.build", 60, args=[XSS])
    beat.add_entry(db_url, "nightly", "reports.purge", crontab(minute=0, hour=3))
    beat.disable_entry(db_url, "nightly")
    html = client.get("/beat").text
    table = html.split('<table class="beat">', 1)[1]
    assert "every-minute" in table and "reports.build" in table and "nightly" in table
    rows = {
        m.group(1): m.group(2) for m in re.finditer(r"<tr>\s*<td>([\w-]+)(.*?)</tr>", table, re.S)
    }
    assert "disabled" in rows["nightly"] and "yes" in rows["every-minute"]
    assert "<script>alert" not in html and "&lt;script&gt;" in rows["every-minute"]


def test_durable_runs_and_waits(client: TestClient, db: psycopg.Connection) -> None:
    db.execute(
        "INSERT INTO pgbroker.durable_wait (task_id, step_index, task_name, kind, name, "
        "deadline) VALUES ('w-1', 2, %s, 'event', %s, now() + interval '1 day'), "
        "('w-2', 0, 'flow', 'sleep', 'cool-off', now() + interval '1 hour')",
        [XSS, XSS],
    )
    db.execute(
        "INSERT INTO pgbroker.durable_run (task_id, run_id, task_name, hostname, pid, "
        "exclusive_key, backend_pid) VALUES ('w-1', gen_random_uuid(), 'flow', 'h1', 42, "
        "'order-7', pg_backend_pid())"
    )
    html = client.get("/durable").text
    waits = html.split('<table class="waits">', 1)[1].split("</table>", 1)[0]
    assert "w-1" in waits and "w-2" in waits and "sleep <code>cool-off</code>" in waits
    runs = html.split('<table class="runs">', 1)[1].split("</table>", 1)[0]
    assert "order-7" in runs and "running" in runs  # the session that inserted it lives
    assert "<script>alert" not in html and "&lt;script&gt;" in waits


def test_a_read_only_role_is_enough(
    db_url: str, db: psycopg.Connection, celery_app: Celery
) -> None:
    """The dashboard only reads: a role with SELECT on the schema serves
    every page (pgbroker's worker pools would refuse it)."""
    import uuid
    from urllib.parse import urlsplit, urlunsplit

    role = f"dash_ro_{uuid.uuid4().hex[:8]}"
    db.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        db.execute(f'GRANT USAGE ON SCHEMA pgbroker TO "{role}"')
        db.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA pgbroker TO "{role}"')
        db.execute(f'GRANT SELECT ON ALL SEQUENCES IN SCHEMA pgbroker TO "{role}"')
        celery_app.backend.mark_as_done("ro-1", 1, request=request("ro-1", "a.b"))
        parts = urlsplit(db_url)
        url = urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rpartition('@')[2]}"))
        with TestClient(create_app(url)) as c:
            for path in ("/", "/tasks", "/task?id=ro-1", "/dead-letters", "/redeliveries"):
                page = c.get(path)
                assert page.status_code == 200, (path, page.text[-500:])
            assert "ro-1" in c.get("/tasks").text
            assert c.get("/beat").status_code == 200 and c.get("/durable").status_code == 200
    finally:
        close_dashboards()
        db.execute(f'DROP OWNED BY "{role}"')
        db.execute(f'DROP ROLE "{role}"')


def test_an_old_schema_is_refused_with_what_to_run(db_url: str, db: psycopg.Connection) -> None:
    db.execute("DELETE FROM pgbroker.schema_version WHERE version >= 16")
    with TestClient(create_app(db_url), raise_server_exceptions=False) as c:
        page = c.get("/")
    assert page.status_code == 503
    assert "version 15" in page.text and "pgbroker migrate" in page.text


def test_the_chart_scales_and_breaks_at_unknown_minutes() -> None:
    from datetime import datetime, timedelta, timezone

    from pgbroker.dashboard import charts
    from pgbroker.dashboard.data import Minute

    t0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    minutes = [Minute(t0 + timedelta(minutes=i), completed=i, failed=0) for i in range(60)]
    for i, m in enumerate(minutes):
        m.published = None if 10 <= i < 20 else 70
    chart = charts.per_minute(minutes)
    assert chart.peak == 70 and [t.label for t in chart.y_ticks] == ["0", "50", "100"]
    published, completed, failed = chart.series
    assert len(published.segments) == 2 and published.total == 50 * 70
    assert len(completed.segments) == 1 and completed.total == sum(range(60))
    first = [p.split(",") for p in completed.segments[0].split()]
    assert float(first[0][1]) == chart.plot_bottom  # 0 sits on the axis
    assert [t.label for t in chart.x_ticks] == ["12:00", "12:15", "12:30", "12:45", "now"]
    assert failed.total == 0


def test_without_the_extra_the_command_says_what_to_install() -> None:
    script = (
        "import sys\n"
        "for m in ('starlette', 'jinja2', 'uvicorn'): sys.modules[m] = None\n"
        "from pgbroker.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGBROKER_")}
    run = subprocess.run(
        [sys.executable, "-c", script, "dashboard", "--url", "postgresql://u:pw@127.0.0.1/x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert 'pip install "pgbroker[dashboard]"' in run.stderr and "pw" not in run.stderr
    helped = subprocess.run(
        [sys.executable, "-c", script, "--help"], env=env, capture_output=True, text=True
    )
    assert helped.returncode == 0 and "dashboard" in helped.stdout


# --- the layer under actions: CSRF checks and the action log -------------------------


def test_an_action_needs_the_form_token_and_the_dashboards_origin(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    from urllib.parse import parse_qs

    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from pgbroker.dashboard import csrf, web

    async def act(request: Request) -> PlainTextResponse:
        form = parse_qs((await request.body()).decode())
        web.check_form(request, form.get(csrf.FIELD, [None])[0])
        web.log_action(request, "test_drop", dead_letter=17)
        return PlainTextResponse("done")

    def client_for(actions: bool) -> TestClient:
        app = create_app(db_url, actions=actions, token="tok") if actions else create_app(db_url)
        app.router.routes.append(Route("/act", act, methods=["POST"]))
        return TestClient(app, base_url="http://dash.example:8600")

    alice = {"Authorization": "Basic " + base64.b64encode(b"alice:tok").decode()}
    caplog.set_level(logging.INFO, logger="pgbroker.dashboard")
    with client_for(actions=True) as c:
        secret = c.app.state.dashboard.csrf_secret
        # Every process serving the dashboard with this token signs alike.
        assert secret == csrf.secret_for("tok") != csrf.secret_for("other")
        good = csrf.token_for(secret, "alice")
        form = {"csrf_token": good}
        assert c.post("/act", data=form, headers=alice).text == "done"
        # Alice's token is not Bob's, and a missing or forged one is refused.
        bob = {"Authorization": "Basic " + base64.b64encode(b"bob:tok").decode()}
        assert c.post("/act", data=form, headers=bob).status_code == 403
        assert c.post("/act", data={}, headers=alice).status_code == 403
        assert c.post("/act", data={"csrf_token": "0" * 64}, headers=alice).status_code == 403
        # Another site's page posting with the browser's credentials.
        other = {**alice, "Origin": "https://evil.example"}
        refused = c.post("/act", data=form, headers=other)
        assert refused.status_code == 403 and "evil.example" in refused.text
        cross = {**alice, "Sec-Fetch-Site": "cross-site"}
        assert c.post("/act", data=form, headers=cross).status_code == 403
        same = {**alice, "Origin": "http://dash.example:8600", "Sec-Fetch-Site": "same-origin"}
        assert c.post("/act", data=form, headers=same).text == "done"
    done = [r for r in caplog.records if getattr(r, "pgbroker_action", None) == "test_drop"]
    assert len(done) == 2
    assert all(r.user == "alice" and r.dead_letter == 17 for r in done)  # type: ignore[attr-defined]
    assert "test_drop by alice" in done[0].getMessage()
    # With actions off, no form is accepted, whatever it carries.
    with client_for(actions=False) as c:
        secret = c.app.state.dashboard.csrf_secret
        off = c.post("/act", data={"csrf_token": csrf.token_for(secret, None)})
        assert off.status_code == 403 and "actions are off" in off.text
