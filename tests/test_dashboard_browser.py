"""The dashboard in a real browser: headless Chromium driven by Playwright,
against the app served by uvicorn, with real Celery workers.

The overview's live part refreshes a queue's count without a reload; every
page opens; the Tasks page finds a task; a chord's task page shows its
graph; a dead letter replayed with the page's button runs on a worker; an
event sent from the Durable runs page finishes a parked durable task; a
beat entry is disabled with its button. Each page is saved as a PNG under
``test-artifacts/dashboard/`` (git-ignored by a .gitignore the test writes
there).

The browser is Debian's ``chromium`` (``apt-get install chromium``;
another binary with ``PGBROKER_CHROMIUM``), launched by Playwright from
PyPI through ``executable_path``: ``playwright install`` is never needed.
Without chromium or playwright the tests skip, unless
``PGBROKER_REQUIRE_BROWSER`` is set (CI: .ci/run), then they fail.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, chord

from pgbroker.dashboard import create_app
from pgbroker.dashboard.pool import close_all as close_dashboards
from pgbroker.database.pools import close_app, close_pools
from pgbroker.operations import beat
from tests import kombu_helpers as kh
from tests.celery_helpers import celery_env, client_app, execute, start_worker, wait_until
from tests.test_dashboard import dead_letter_of
from tests.test_dashboard_worker import results_app, results_worker

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
DURABLE_APP = "tests.apps.durable_waits_app"
TOKEN = "s3cret-token"
XSS = "<script>alert(1)</script>"
#: Milliseconds Playwright waits for what a step expects.
WAIT_MS = 20_000


def _chromium() -> str | None:
    given = os.environ.get("PGBROKER_CHROMIUM")
    if given:
        return given if os.access(given, os.X_OK) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _missing(why: str) -> None:
    if os.environ.get("PGBROKER_REQUIRE_BROWSER"):
        pytest.fail(f"PGBROKER_REQUIRE_BROWSER is set but {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install playwright; no browser download)")
    executable = _chromium()
    if executable is None:
        _missing("no chromium found (apt-get install chromium, or set PGBROKER_CHROMIUM)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS.parent / ".gitignore").write_text(
        "# Written by tests/test_dashboard_browser.py\n*\n"
    )
    with sync_playwright() as p:
        # Root (a CI container) cannot use Chromium's sandbox.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        chromium = p.chromium.launch(executable_path=executable, headless=True, args=args)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A tab signed in as alice (HTTP basic auth with the token)."""
    context = browser.new_context(
        http_credentials={"username": "alice", "password": TOKEN},
        viewport={"width": 1280, "height": 800},
    )
    context.set_default_timeout(WAIT_MS)
    tab = context.new_page()
    yield tab
    context.close()


@contextlib.contextmanager
def serve(db_url: str, **options: Any) -> Iterator[str]:
    """The dashboard (actions on, a token) served by uvicorn in a thread."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(db_url, actions=True, token=TOKEN, **options)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 15, "uvicorn to listen")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        close_dashboards()


def shot(tab: Any, name: str, *, full_page: bool = False) -> None:
    tab.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full_page)


def test_the_overview_refreshes_without_a_reload(db_url: str, page: Any) -> None:
    from playwright.sync_api import expect

    app = Celery("dash", broker=db_url, backend=db_url, set_as_current=False)
    app.conf.broker_transport_options = kh.FAST
    try:
        app.send_task("billing.charge", args=[1], queue="billing")
        with serve(db_url, refresh=0.5) as base:
            page.goto(base + "/")
            row = page.locator("table.queues tr", has=page.get_by_role("link", name="billing"))
            ready = row.locator("td.num").first
            expect(ready).to_have_text("1")
            # A mark on the window: a reload would lose it.
            page.evaluate("window.pgbrokerMark = 'still here'")
            for i in range(2, 4):
                app.send_task("billing.charge", args=[i], queue="billing")
            expect(ready).to_have_text("3")
            assert page.evaluate("window.pgbrokerMark") == "still here"
            expect(page.locator("#live svg.chart")).to_be_visible()
            shot(page, "overview")
    finally:
        close_app(app)
        close_pools("results")


def test_pages_search_canvas_and_actions(db_url: str, tmp_path: Path, page: Any) -> None:
    from playwright.sync_api import expect

    execute(db_url, "CREATE TABLE effect (id serial, key text, step text, pid int)")
    beat.add_entry(db_url, "nightly-report", "reports.build", 3600, args=[XSS])
    durable_env = celery_env(db_url)
    with (
        results_app(db_url) as app,
        client_app(DURABLE_APP, db_url) as durable,
    ):
        # A dead letter, before any worker could run its message.
        lost = app.add.delay(20, 22)
        with contextlib.closing(_connect(db_url)) as db:
            dead_letter_of(db, lost.id, "rejected")
        with (
            results_worker(db_url, tmp_path) as worker,
            start_worker(
                DURABLE_APP, durable_env, tmp_path, "durable", ("--concurrency=1", "-Q", "durable")
            ) as durable_worker,
            serve(db_url) as base,
        ):
            worker.wait_for_log("ready.", timeout=60)
            durable_worker.wait_for_log("ready.", timeout=60)
            ok = app.identity.delay({"text": XSS})
            fan = chord([app.add.s(i, i) for i in range(3)])(app.xsum.s())
            flow = durable.approval_flow.apply_async(args=[62], queue="durable")
            assert fan.get(timeout=30) == 6 and ok.get(timeout=30) == {"text": XSS}
            durable_worker.wait_for_log(
                f"approval_flow[{flow.id}]: waiting for event 'approval:62'", timeout=30
            )

            # Every page opens, and shows task data as text: no script of it runs.
            dialogs: list[str] = []

            def dialog(d: Any) -> None:
                dialogs.append(d.message)
                d.dismiss()

            page.on("dialog", dialog)
            for path, name in [
                ("/", "overview-tasks"),
                ("/tasks", "tasks"),
                ("/durable", "durable"),
                ("/dead-letters", "dead-letters"),
                ("/beat", "beat"),
                ("/redeliveries", "redeliveries"),
            ]:
                response = page.goto(base + path)
                assert response is not None and response.status == 200, path
                expect(page.locator("header .brand")).to_have_text("pgbroker")
                assert "signed in as alice" in page.locator("header").inner_text()
                shot(page, name)

            # Search: the chord's body by name, then its page with the graph.
            page.goto(base + "/tasks")
            page.fill("input[name=name]", "tests.apps.results_app.xsum")
            page.get_by_role("button", name="Search").click()
            expect(page).to_have_url(re.compile(r"/tasks\?.*name=tests.apps.results_app.xsum"))
            page.get_by_role("link", name=fan.id).first.click()
            expect(page.locator("h1")).to_contain_text(fan.id)
            canvas = page.locator("ul.canvas")
            expect(canvas.locator("a.id")).to_have_count(4)  # three members and the body
            expect(canvas.locator(".state-SUCCESS")).to_have_count(4)
            expect(canvas.locator("li.me")).to_contain_text(fan.id)
            shot(page, "task-chord", full_page=True)
            page.goto(base + f"/task?id={ok.id}")
            expect(page.locator("pre").first).to_contain_text(XSS)  # as text
            shot(page, "task")

            # Replay the dead letter with its button: it runs on the worker.
            page.goto(base + "/dead-letters")
            row = page.locator("table.dead-letters tr", has_text=lost.id)
            shot(page, "dead-letters")
            page.goto(base + "/dead-letter?id=" + row.locator("td.num a").first.inner_text())
            shot(page, "dead-letter")
            page.go_back()
            row.get_by_role("button", name="Replay").click()
            expect(page.locator(".done")).to_contain_text("Replayed 1")
            page.get_by_role("link", name=lost.id).click()
            assert lost.get(timeout=30) == 42
            page.reload()
            expect(page.locator("dd.state")).to_have_text("SUCCESS")

            # Send the event from the parked task's row: the task finishes.
            page.goto(base + "/durable")
            wait = page.locator("table.waits tr", has_text=flow.id)
            wait.locator("input[name=payload]").fill('{"approved": true, "by": "alice"}')
            wait.get_by_role("button", name="Send").click()
            expect(page.locator(".done")).to_contain_text("1 woken now")
            shot(page, "event-sent")
            assert flow.get(timeout=30)["answer"] == {"approved": True, "by": "alice"}
            page.get_by_role("link", name=flow.id).click()
            expect(page.locator("dd.state")).to_have_text("SUCCESS")
            shot(page, "task-durable")

            # Disable the beat entry with its button.
            page.goto(base + "/beat")
            page.locator("table.beat tr", has_text="nightly-report").get_by_role(
                "button", name="Disable"
            ).click()
            expect(page.locator(".done")).to_contain_text("disabled")
            page.goto(base + "/beat")
            entry = page.locator("table.beat tr", has_text="nightly-report")
            expect(entry.get_by_role("button", name="Enable")).to_be_visible()
            assert [e.enabled for e in beat.list_entries(db_url)] == [False]
            assert dialogs == []


def _connect(db_url: str) -> Any:
    import psycopg

    return psycopg.connect("postgresql://" + db_url.partition("://")[2], autocommit=True)
