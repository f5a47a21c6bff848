"""The dashboard's actions (pgbroker.dashboard.actions), through Starlette's
test client: replay or drop dead letters, send a durable event, enable or
disable a beat entry. Each is refused with actions off, without the token
or with a wrong one, without the form's CSRF token or from another site,
and with a role that may only read; accepted with all of it, and logged
with who did it. Real workers run what the actions set going in
tests/test_dashboard_worker.py and tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import base64
import html
import logging
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from celery import Celery
from starlette.testclient import TestClient

from pgbroker.dashboard import create_app, csrf
from pgbroker.dashboard.pool import close_all as close_dashboards
from pgbroker.database.pools import close_app, close_pools
from pgbroker.operations import beat
from tests import kombu_helpers as kh
from tests.test_dashboard import dead_letter_of

TOKEN = "s3cret-token"
XSS = "<script>alert(1)</script>"
BASE = "http://dash.example:8600"


def basic(user: str, token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()}


ALICE = basic("alice")


@pytest.fixture(autouse=True)
def _close_dashboard_pools() -> Iterator[None]:
    yield
    close_dashboards()


@pytest.fixture
def acting(db_url: str) -> Iterator[TestClient]:
    """A dashboard with actions on, as a browser at its address would reach it."""
    with TestClient(create_app(db_url, actions=True, token=TOKEN), base_url=BASE) as c:
        yield c


@pytest.fixture
def celery_app(db_url: str) -> Iterator[Celery]:
    app = Celery("dash", broker=db_url, backend=db_url, set_as_current=False)
    app.conf.broker_transport_options = kh.FAST
    yield app
    close_app(app)
    close_pools("results")


def token_of(client: TestClient, user: str = "alice") -> str:
    return csrf.token_for(client.app.state.dashboard.csrf_secret, user)  # type: ignore[attr-defined]


def form_token(html: str) -> str:
    """The CSRF token a page's forms carry."""
    found = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', html)
    assert found is not None, html[-2000:]
    return found.group(1)


def dead_letters(db: psycopg.Connection) -> dict[str, int]:
    """task id -> dead letter id."""
    return dict(db.execute("SELECT task_id, id FROM pgbroker.dead_letter").fetchall())


def ready(db: psycopg.Connection, task_id: str) -> int:
    row = db.execute(
        "SELECT count(*) FROM pgbroker.message WHERE task_id = %s AND state = 'ready'",
        [task_id],
    ).fetchone()
    assert row is not None
    return int(row[0])


#: The fields the actions log besides pgbroker_action and user.
FIELDS = {"ids", "queue", "reason", "replayed", "dropped", "event", "entry", "waiting", "woken"}


def actions_logged(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, dict[str, Any]]]:
    """(action, user, fields) of each action logged."""
    found = []
    for r in caplog.records:
        action = getattr(r, "pgbroker_action", None)
        if r.name == "pgbroker.dashboard" and action:
            extra = {k: v for k, v in vars(r).items() if k in FIELDS}
            found.append((action, getattr(r, "user", ""), extra))
    return found


ROUTES = {
    "/dead-letters/replay": {"id": "1"},
    "/dead-letters/drop": {"id": "1"},
    "/durable/event": {"event": "approval:1", "payload": "true"},
    "/beat/enable": {"entry": "nightly"},
    "/beat/disable": {"entry": "nightly"},
}


# --- refusals ------------------------------------------------------------------------


def test_actions_are_refused_when_off(db_url: str) -> None:
    with TestClient(create_app(db_url)) as c:
        page = c.get("/dead-letters").text
        assert '<form method="post"' not in page and "read-only" in page
        for path, form in ROUTES.items():
            refused = c.post(path, data=form)
            assert refused.status_code == 403, path
            assert "actions are off" in refused.text
        assert c.get("/dead-letters/replay").status_code == 405
    # With a token but without --actions: the same.
    with TestClient(create_app(db_url, token=TOKEN)) as c:
        for path, form in ROUTES.items():
            assert c.post(path, data=form, headers=ALICE).status_code == 403, path


def test_actions_are_refused_without_credentials_or_csrf(
    acting: TestClient, db: psycopg.Connection, celery_app: Celery
) -> None:
    celery_app.send_task("billing.void", task_id="dl-1", queue="billing")
    dead_letter_of(db, "dl-1", "rejected")
    letter = dead_letters(db)["dl-1"]
    beat.add_entry(acting.app.state.dashboard.url, "nightly", "reports.purge", 60)  # type: ignore[attr-defined]
    good = token_of(acting)
    for path, fields in ROUTES.items():
        form = {**fields, "id": str(letter), "csrf_token": good}
        # No credentials, a wrong token, a wrong password: 401 before anything.
        assert acting.post(path, data=form).status_code == 401, path
        assert acting.post(path, data=form, headers=basic("alice", "nope")).status_code == 401
        bearer = {"Authorization": "Bearer wrong"}
        assert acting.post(path, data=form, headers=bearer).status_code == 401
        # Signed in, but no CSRF token, a forged one, or Bob's.
        no_token = {k: v for k, v in form.items() if k != "csrf_token"}
        assert acting.post(path, data=no_token, headers=ALICE).status_code == 403, path
        forged = {**form, "csrf_token": "0" * 64}
        assert acting.post(path, data=forged, headers=ALICE).status_code == 403
        assert acting.post(path, data=form, headers=basic("bob")).status_code == 403
        # Another site's page posting with the browser's credentials.
        evil = {**ALICE, "Origin": "https://evil.example"}
        refused = acting.post(path, data=form, headers=evil)
        assert refused.status_code == 403 and "evil.example" in refused.text
        cross = {**ALICE, "Sec-Fetch-Site": "cross-site"}
        assert acting.post(path, data=form, headers=cross).status_code == 403
    # Nothing happened.
    assert dead_letters(db) == {"dl-1": letter}
    (entry,) = beat.list_entries(acting.app.state.dashboard.url)  # type: ignore[attr-defined]
    assert entry.enabled
    assert not db.execute("SELECT 1 FROM pgbroker.durable_event").fetchall()


# --- each action ---------------------------------------------------------------------


def test_replay_and_drop_one_dead_letter(
    acting: TestClient, db: psycopg.Connection, celery_app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgbroker.dashboard")
    for i in (1, 2):
        celery_app.send_task("billing.void", args=[XSS], task_id=f"dl-{i}", queue="billing")
        dead_letter_of(db, f"dl-{i}", "rejected")
    ids = dead_letters(db)
    # The list and each letter's page offer the buttons, with the user's token.
    listing = acting.get("/dead-letters", headers=ALICE).text
    assert form_token(listing) == token_of(acting)
    assert 'action="/dead-letters/replay"' in listing and "Drop all 2 matching" in listing
    one = acting.get("/dead-letter", params={"id": ids["dl-1"]}, headers=ALICE).text
    assert f'name="id" value="{ids["dl-1"]}"' in one
    # A browser's same-origin post.
    browser = {**ALICE, "Origin": BASE, "Sec-Fetch-Site": "same-origin"}
    form = {"csrf_token": form_token(one), "id": str(ids["dl-1"]), "task_id": "dl-1"}
    done = acting.post("/dead-letters/replay", data=form, headers=browser)
    assert done.status_code == 200, done.text
    assert "Replayed 1 (dead letter" in done.text and "1 message(s) to queue billing" in done.text
    assert 'href="/task?id=dl-1"' in done.text
    assert ready(db, "dl-1") == 1 and "dl-1" not in dead_letters(db)
    # Again: it is gone, nothing is done twice.
    again = acting.post("/dead-letters/replay", data=form, headers=browser)
    assert "Replayed 0" in again.text and "Not found" in again.text
    assert ready(db, "dl-1") == 1

    drop = {"csrf_token": token_of(acting), "id": str(ids["dl-2"])}
    dropped = acting.post("/dead-letters/drop", data=drop, headers=ALICE)
    assert dropped.status_code == 200 and "Dropped 1" in dropped.text
    assert dead_letters(db) == {} and ready(db, "dl-2") == 0
    bad = acting.post("/dead-letters/replay", data={"csrf_token": token_of(acting)}, headers=ALICE)
    assert bad.status_code == 400

    logged = actions_logged(caplog)
    assert [(a, u) for a, u, _ in logged] == [
        ("replay_dead_letters", "alice"),
        ("replay_dead_letters", "alice"),
        ("drop_dead_letters", "alice"),
    ]
    assert logged[0][2] == {"ids": [ids["dl-1"]], "replayed": 1}
    assert logged[2][2] == {"ids": [ids["dl-2"]], "dropped": 1}
    assert any("replay_dead_letters by alice" in r.getMessage() for r in caplog.records)


def test_replay_and_drop_all_matching_a_filter(
    acting: TestClient, db: psycopg.Connection, celery_app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgbroker.dashboard")
    for i, (queue, reason) in enumerate(
        [
            ("billing", "rejected"),
            ("billing", "rejected"),
            ("billing", "expired"),
            ("mail", "rejected"),
        ]
    ):
        celery_app.send_task("t", task_id=f"dl-{i}", queue=queue)
        dead_letter_of(db, f"dl-{i}", reason)
    page = acting.get(
        "/dead-letters", params={"queue": "billing", "reason": "rejected"}, headers=ALICE
    )
    assert "Replay all 2 matching" in page.text
    assert 'name="queue" value="billing"' in page.text
    form = {
        "csrf_token": form_token(page.text),
        "all": "1",
        "queue": "billing",
        "reason": "rejected",
    }
    done = acting.post("/dead-letters/replay", data=form, headers=ALICE)
    said = html.unescape(done.text)
    assert "Replayed 2 (every dead letter of queue 'billing' and reason 'rejected')" in said
    assert sorted(dead_letters(db)) == ["dl-2", "dl-3"]
    assert ready(db, "dl-0") == ready(db, "dl-1") == 1
    # Dropping all needs the confirmation box.
    drop = {**form, "reason": ""}
    refused = acting.post("/dead-letters/drop", data=drop, headers=ALICE)
    assert refused.status_code == 403 and "confirmation" in refused.text
    assert sorted(dead_letters(db)) == ["dl-2", "dl-3"]
    done = acting.post("/dead-letters/drop", data={**drop, "confirm": "yes"}, headers=ALICE)
    assert "Dropped 1 (every dead letter of queue 'billing')" in html.unescape(done.text)
    assert sorted(dead_letters(db)) == ["dl-3"]
    logged = actions_logged(caplog)
    assert logged == [
        (
            "replay_dead_letters",
            "alice",
            {"queue": "billing", "reason": "rejected", "replayed": 2},
        ),
        ("drop_dead_letters", "alice", {"queue": "billing", "dropped": 1}),
    ]


def test_send_an_event_with_a_json_payload(
    acting: TestClient, db: psycopg.Connection, celery_app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgbroker.dashboard")
    # A parked run: its wait, and its message delayed until the wait's deadline.
    celery_app.send_task("flow", task_id="w-1", queue="flows")
    db.execute(
        "UPDATE pgbroker.message SET state = 'delayed', visible_at = now() + interval '1 day' "
        "WHERE task_id = 'w-1'"
    )
    db.execute(
        "INSERT INTO pgbroker.durable_wait (task_id, step_index, task_name, kind, name, "
        "deadline) VALUES ('w-1', 1, 'flow', 'event', %s, now() + interval '1 day')",
        [f"approval:{XSS}"],
    )
    page = acting.get("/durable", headers=ALICE).text
    # The wait's form names its event, escaped.
    assert 'name="event" value="approval:&lt;script&gt;alert(1)&lt;/script&gt;"' in page
    assert "<script>alert" not in page
    form = {"csrf_token": form_token(page), "event": f"approval:{XSS}"}
    bad = acting.post("/durable/event", data={**form, "payload": "{not json"}, headers=ALICE)
    assert bad.status_code == 400 and "not JSON" in bad.text
    assert not db.execute("SELECT 1 FROM pgbroker.durable_event").fetchall()
    assert (
        acting.post("/durable/event", data={**form, "event": " "}, headers=ALICE).status_code == 400
    )

    payload = '{"approved": true, "by": "ann"}'
    sent = acting.post("/durable/event", data={**form, "payload": payload}, headers=ALICE)
    assert sent.status_code == 200, sent.text
    assert "1 task(s) waiting on it; 1 woken now" in sent.text
    assert 'href="/task?id=w-1"' in sent.text and ready(db, "w-1") == 1
    assert "<script>alert" not in sent.text
    (row,) = db.execute(
        "SELECT name, convert_from(payload, 'utf8')::jsonb, content_type "
        "FROM pgbroker.durable_event"
    ).fetchall()
    assert row == (f"approval:{XSS}", {"approved": True, "by": "ann"}, "application/json")
    again = acting.post("/durable/event", data={**form, "payload": "1"}, headers=ALICE)
    assert "the first payload is kept" in again.text
    assert actions_logged(caplog)[0] == (
        "send_event",
        "alice",
        {"event": f"approval:{XSS}", "waiting": 1, "woken": 1},
    )


def test_enable_and_disable_a_beat_entry(
    acting: TestClient, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgbroker.dashboard")
    beat.add_entry(db_url, "nightly", "reports.purge", 60)
    beat.add_entry(db_url, XSS, "reports.build", 60, enabled=False)
    page = acting.get("/beat", headers=ALICE).text
    assert 'action="/beat/disable"' in page and 'action="/beat/enable"' in page
    assert 'value="&lt;script&gt;alert(1)&lt;/script&gt;"' in page and "<script>alert" not in page

    def enabled() -> dict[str, bool]:
        return {e.name: e.enabled for e in beat.list_entries(db_url)}

    form = {"csrf_token": form_token(page), "entry": "nightly"}
    off = acting.post("/beat/disable", data=form, headers=ALICE)
    assert off.status_code == 200 and "disabled" in off.text
    assert enabled() == {"nightly": False, XSS: False}
    on = acting.post("/beat/enable", data={**form, "entry": XSS}, headers=ALICE)
    assert on.status_code == 200 and "&lt;script&gt;" in on.text and "<script>alert" not in on.text
    assert enabled() == {"nightly": False, XSS: True}
    missing = acting.post("/beat/enable", data={**form, "entry": "nope"}, headers=ALICE)
    assert missing.status_code == 404
    assert [(a, u, x["entry"]) for a, u, x in actions_logged(caplog)] == [
        ("disable_beat_entry", "alice", "nightly"),
        ("enable_beat_entry", "alice", XSS),
    ]


# --- a role that may only read -------------------------------------------------------


@pytest.fixture
def read_only_url(db_url: str, db: psycopg.Connection) -> Iterator[str]:
    role = f"dash_ro_{uuid.uuid4().hex[:8]}"
    db.execute(f'CREATE ROLE "{role}" LOGIN')
    db.execute(f'GRANT USAGE ON SCHEMA pgbroker TO "{role}"')
    db.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA pgbroker TO "{role}"')
    parts = urlsplit(db_url)
    try:
        yield urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rpartition('@')[2]}"))
    finally:
        close_dashboards()
        db.execute(f'DROP OWNED BY "{role}"')
        db.execute(f'DROP ROLE "{role}"')


def test_a_read_only_role_cannot_act_and_says_so(
    read_only_url: str, db: psycopg.Connection, celery_app: Celery
) -> None:
    celery_app.send_task("t", task_id="dl-ro", queue="billing")
    dead_letter_of(db, "dl-ro", "rejected")
    letter = dead_letters(db)["dl-ro"]
    with TestClient(create_app(read_only_url, actions=True, token=TOKEN)) as c:
        assert c.get("/dead-letters", headers=ALICE).status_code == 200  # reading is fine
        form = {"csrf_token": token_of(c), "id": str(letter)}
        refused = c.post("/dead-letters/replay", data=form, headers=ALICE)
        assert refused.status_code == 403
        assert "may only read" in refused.text and "privilege" in refused.text
    assert dead_letters(db) == {"dl-ro": letter}
    # The command checks it at start.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGBROKER_")}
    env["PGBROKER_DASHBOARD_TOKEN"] = TOKEN
    run = subprocess.run(
        [sys.executable, "-m", "pgbroker", "dashboard", "--url", read_only_url, "--actions"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert "--actions:" in run.stderr and "may only read" in run.stderr


def test_the_command_logs_each_action_on_stderr(db_url: str) -> None:
    """`pgbroker dashboard --actions`: the action log reaches stderr, naming
    the user."""
    import urllib.error
    import urllib.request

    from tests.celery_helpers import wait_until
    from tests.test_dashboard import _free_port

    beat.add_entry(db_url, "nightly", "reports.purge", 60)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGBROKER_")}
    env.update(PGBROKER_URL=db_url, PGBROKER_DASHBOARD_TOKEN=TOKEN)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgbroker", "dashboard", "--actions", "--port", str(port)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"

    def get(path: str) -> str | None:
        try:
            with urllib.request.urlopen(urllib.request.Request(base + path, headers=ALICE)) as r:
                body: str = r.read().decode()
                return body
        except (OSError, urllib.error.HTTPError):
            return None

    try:
        page = wait_until(lambda: get("/beat"), 20, "the dashboard to answer")
        data = f"csrf_token={form_token(page)}&entry=nightly".encode()
        post = urllib.request.Request(base + "/beat/disable", data=data, headers=ALICE)
        with urllib.request.urlopen(post) as r:
            assert r.status == 200
        assert not beat.list_entries(db_url)[0].enabled
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "INFO pgbroker.dashboard: dashboard: disable_beat_entry by alice (127.0.0.1)" in err
    assert "entry='nightly'" in err
