"""End-to-end: real ``celery worker`` subprocesses (prefork) with pgbroker as
the result backend, and pgbroker or Redis as the broker."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import chain, chord, group
from celery.exceptions import ChordError, TaskRevokedError

from pgbroker.dashboard.pages import timeline
from pgbroker.operations import admin
from tests import pgserver, refbrokers
from tests.celery_helpers import get_waits, wait_until

ROOT = Path(__file__).resolve().parent.parent
CELERY = str(Path(sys.executable).with_name("celery"))


class Worker:
    def __init__(self, env: dict[str, str], concurrency: int = 3, pool: str = "prefork") -> None:
        self.output: list[str] = []
        self.proc = subprocess.Popen(
            [
                CELERY,
                "-A",
                "tests.apps.results_app",
                "worker",
                "-P",
                pool,
                "-c",
                str(concurrency),
                "-l",
                "INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                f"rb{uuid.uuid4().hex[:6]}@%h",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._ready = threading.Event()
        self._pumping = threading.Thread(target=self._pump, daemon=True)
        self._pumping.start()
        if not self._ready.wait(60):
            self.stop()
            raise RuntimeError("worker did not start:\n" + "".join(self.output[-50:]))

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            if " ready." in line:
                self._ready.set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._pumping.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def log(self) -> str:
        return "".join(self.output)


@contextlib.contextmanager
def database(admin: str, template: str) -> Iterator[str]:
    name = f"pgbroker_rb_{uuid.uuid4().hex[:10]}"
    pgserver.create_database(admin, name, template=template)
    try:
        yield pgserver.url_for(admin, name)
    finally:
        pgserver.drop_database(admin, name)


def make_env(broker: str, backend: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ, RB_BROKER=broker, RB_BACKEND=backend, **extra)
    env["PYTHONPATH"] = str(ROOT)
    return env


@contextlib.contextmanager
def running(
    broker: str, backend: str, pool: str = "prefork", **extra: str
) -> Iterator[tuple[Any, Worker]]:
    """The test app configured like the worker, and the worker."""
    env = make_env(broker, backend, **extra)
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith("RB_")})
    import importlib

    # Imported again if another test dropped it from sys.modules (client_app).
    results_app = importlib.reload(importlib.import_module("tests.apps.results_app"))
    worker = Worker(env, pool=pool)
    try:
        yield results_app, worker
    finally:
        worker.stop()
        # Celery's app.close() leaves the result backend's LISTEN connection open.
        results_app.app.backend.result_consumer.stop()
        results_app.app.close()
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def pg_both(pg_admin_url: str, template_db: str) -> Iterator[tuple[Any, Worker, str]]:
    """pgbroker as broker and backend, one worker for the module."""
    with database(pg_admin_url, template_db) as url, running(url, url) as (mod, worker):
        yield mod, worker, url


def conn_for(url: str) -> psycopg.Connection:
    return psycopg.connect(pgserver.libpq_url(url), autocommit=True)


T = 30  # seconds: every wait is bounded


def test_success_row_and_extended_fields(pg_both: Any) -> None:
    mod, _worker, url = pg_both
    r = mod.add.delay(2, 3)
    assert r.get(timeout=T) == 5
    assert r.name == "tests.apps.results_app.add"
    assert r.args == [2, 3]
    assert r.kwargs == {}
    assert r.worker and r.worker.startswith("rb")
    assert r.queue == "celery"
    assert r.date_done is not None
    with conn_for(url) as c:
        row = c.execute(
            "SELECT state, name, worker, queue, retries, date_done IS NOT NULL, content_type "
            "FROM pgbroker.task_result WHERE task_id = %s",
            [r.id],
        ).fetchone()
    assert row == (
        "SUCCESS",
        "tests.apps.results_app.add",
        r.worker,
        "celery",
        0,
        True,
        "application/json",
    )


def test_failure_traceback_and_sql_query(pg_both: Any) -> None:
    mod, _worker, url = pg_both
    r = mod.fail.delay("boom")
    with pytest.raises(ValueError, match="boom"):
        r.get(timeout=T)
    assert r.state == "FAILURE"
    assert "ValueError: boom" in r.traceback
    with conn_for(url) as c:
        rows = c.execute(
            "SELECT task_id, traceback FROM pgbroker.task_result "
            "WHERE state = 'FAILURE' AND date_done > now() - interval '1 hour'"
        ).fetchall()
    assert r.id in [row[0] for row in rows]


def test_retry_then_success(pg_both: Any) -> None:
    mod, _worker, url = pg_both
    r = mod.retry_until.delay(2)
    assert r.get(timeout=T) == 2
    assert r.retries == 2
    # Each retry is logged with its reason and its run's times, which the
    # final state would otherwise have overwritten; the dashboard's
    # timeline shows the three runs in order. (Runs 1 s apart: a RETRY is
    # stored after its retry is sent, and one stored after the next run's
    # final state is not logged, the final state being kept.)
    r = mod.retry_until.delay(2, countdown=1.0)
    assert r.get(timeout=T) == 2
    with conn_for(url) as c:
        detail = admin.show_task(c, "pgbroker", r.id)
    result = detail.result
    assert result is not None and result.date_done is not None
    log = result.retry_log
    assert [e.reason for e in log] == ["RuntimeError: try 0", "RuntimeError: try 1"]
    times = []
    for e in log:
        assert e.received_at is not None and e.started_at is not None and e.at is not None
        times += [e.received_at, e.started_at, e.at]
    assert result.received_at is not None and result.started_at is not None
    times += [result.received_at, result.started_at, result.date_done]
    assert times == sorted(times), times
    whats = [e.what for e in timeline(detail) if e.what != "first state stored"]
    assert whats == [*["received", "started", "RETRY"] * 2, "received", "started", "SUCCESS"]


def test_started_and_custom_state(pg_both: Any, tmp_path: Path) -> None:
    mod, _worker, _url = pg_both
    flag = tmp_path / "go"
    r = mod.progress.delay(str(flag))
    deadline = time.monotonic() + T
    while r.state != "PROGRESS" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert r.state == "PROGRESS"
    assert r.info == {"done": 1, "of": 2}
    flag.touch()
    assert r.get(timeout=T) == "finished"


def test_started_state_with_track_started(pg_both: Any) -> None:
    mod, _worker, _url = pg_both
    r = mod.sleep.delay(1.5)
    deadline = time.monotonic() + T
    while r.state != "STARTED" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert r.state == "STARTED"
    assert r.get(timeout=T) == 1.5


def test_revoke(pg_both: Any) -> None:
    mod, worker, _url = pg_both
    task_id = str(uuid.uuid4())
    mod.app.control.revoke(task_id)
    # The worker has the broadcast before the task is sent.
    wait_until(
        lambda: f"Tasks flagged as revoked: {task_id}" in worker.log(),
        T,
        "the worker to take the revoke",
    )
    r = mod.add.apply_async((1, 1), task_id=task_id)
    with pytest.raises(TaskRevokedError):
        r.get(timeout=T)
    assert r.state == "REVOKED"


def test_children(pg_both: Any) -> None:
    mod, _worker, _url = pg_both
    r = mod.spawn.delay()
    assert r.get(timeout=T) == "spawned"
    children = r.children
    assert len(children) == 2
    assert sorted(c.get(timeout=T) for c in children) == [3, 7]


def test_group_native_join_and_save(pg_both: Any) -> None:
    mod, _worker, _url = pg_both
    g = group(mod.add.s(i, i) for i in range(10)).apply_async()
    assert g.supports_native_join
    assert g.get(timeout=T) == [i * 2 for i in range(10)]
    g.save()
    restored = mod.app.GroupResult.restore(g.id)
    assert [r.id for r in restored.results] == [r.id for r in g.results]
    assert restored.get(timeout=T) == [i * 2 for i in range(10)]
    restored.delete()
    assert mod.app.GroupResult.restore(g.id) is None


def test_chord_counts_once_and_no_chord_unlock(pg_both: Any) -> None:
    mod, worker, url = pg_both
    r = chord(mod.add.s(i, 1) for i in range(20))(mod.xsum.s())
    assert r.get(timeout=T) == sum(range(1, 21))
    assert "chord_unlock" not in worker.log()
    with conn_for(url) as c:
        row = c.execute(
            "SELECT size, done, fired FROM pgbroker.chord WHERE group_id = %s",
            [r.parent.id],
        ).fetchone()
    assert row == (20, 20, True)


def test_chord_error_propagates_and_errback_runs(pg_both: Any) -> None:
    mod, _worker, _url = pg_both
    errback_id = str(uuid.uuid4())
    body = mod.xsum.s().on_error(mod.identity.si("errback ran").set(task_id=errback_id))
    r = chord([mod.add.s(1, 1), mod.fail.s("header failed")], body).apply_async()
    # r.get() re-raises the header's own error first (Celery checks parents);
    # the body's stored result is the ChordError.
    with pytest.raises(ValueError, match="header failed"):
        r.get(timeout=T)
    body_result = mod.app.AsyncResult(r.id)
    with pytest.raises(ChordError, match="header failed"):
        body_result.get(timeout=T)
    assert mod.app.AsyncResult(errback_id).get(timeout=T) == "errback ran"


def test_chord_with_chains_in_header(pg_both: Any) -> None:
    mod, _worker, _url = pg_both
    header = [chain(mod.add.s(1, 1), mod.mul.s(10)), chain(mod.add.s(2, 2), mod.mul.s(10))]
    r = chord(header)(mod.xsum.s())
    assert r.get(timeout=T) == 60


def test_chain_ending_in_chord(pg_both: Any) -> None:
    mod, _worker, _url = pg_both
    c = chain(mod.add.s(1, 1), chord([mod.mul.s(2), mod.mul.s(3)], mod.xsum.s()))
    assert c.apply_async().get(timeout=T) == 10


def test_nested_chords(pg_both: Any) -> None:
    mod, _worker, _url = pg_both
    inner = chord([mod.add.s(1, 1), mod.add.s(2, 2)], mod.xsum.s())
    outer = chord([inner, mod.add.s(10, 10)], mod.xsum.s())
    assert outer.apply_async().get(timeout=T) == 26


def test_group_of_chains(pg_both: Any) -> None:
    mod, _worker, _url = pg_both
    g = group(chain(mod.add.s(i, i), mod.mul.s(2)) for i in range(4)).apply_async()
    assert g.get(timeout=T) == [0, 4, 8, 12]


def test_add_to_chord(pg_both: Any) -> None:
    mod, _worker, _url = pg_both
    r = chord([mod.grow_chord.s(1), mod.add.s(2, 3)])(mod.xsum.s())
    assert r.get(timeout=T) == 106


def test_large_result_limit(pg_admin_url: str, template_db: str) -> None:
    with (
        database(pg_admin_url, template_db) as url,
        running(url, url, RB_MAX_RESULT="1024") as (mod, worker),
    ):
        r = mod.big.delay(5000)
        with pytest.raises(Exception, match="max_result_size") as info:
            r.get(timeout=T)
        assert type(info.value).__name__ == "ResultTooLarge"
        assert mod.big.delay(10).get(timeout=T) == "x" * 10
        assert worker.proc.poll() is None


def test_redis_broker_with_pgbroker_backend(pg_admin_url: str, template_db: str) -> None:
    # The Redis may be shared: a queue and a key prefix of the test's own,
    # whose keys alone are deleted at the end (tests/refbrokers.py).
    with (
        refbrokers.redis_namespace("e2e") as (client, prefix),
        database(pg_admin_url, template_db) as url,
        running(refbrokers.REDIS_URL, url, RB_QUEUE=prefix.rstrip(":"), RB_REDIS_PREFIX=prefix) as (
            mod,
            worker,
        ),
    ):
        assert mod.app.conf.task_default_queue == prefix.rstrip(":")
        assert mod.add.delay(20, 22).get(timeout=T) == 42
        r = chord(mod.add.s(i, i) for i in range(5))(mod.xsum.s())
        assert r.get(timeout=T) == 20
        assert "chord_unlock" not in worker.log()
        g = group(mod.add.s(i, 1) for i in range(5)).apply_async()
        assert g.get(timeout=T) == [1, 2, 3, 4, 5]
        with pytest.raises(ValueError):
            mod.fail.delay("x").get(timeout=T)
        idle_get_sends_no_query(mod, url)
        # Everything Kombu wrote is under the test's prefix.
        assert any(client.scan_iter(match=f"{prefix}*"))


def idle_get_sends_no_query(mod: Any, url: str) -> None:
    """While get() waits for a running task, this process sends no query."""
    r = mod.sleep.delay(3)
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(r.get(timeout=T)))
    t.start()
    try:
        wait_until(lambda: get_waits(r.backend, r.id), T, "get() to wait for its NOTIFY")
        app_name = f"pgbroker:{os.uname().nodename}:{os.getpid()}"
        q = "SELECT max(query_start), count(*) FROM pg_stat_activity WHERE application_name = %s"
        with conn_for(url) as c:
            before = c.execute(q, [app_name]).fetchone()
            time.sleep(1.5)  # on purpose: a window in which no query may be sent
            after = c.execute(q, [app_name]).fetchone()
        assert before is not None and before[1] >= 1
        assert after == before, "an idle get() sent a query"
    finally:
        t.join(T)
    assert got == [3]


def test_pickle_serializer(pg_admin_url: str, template_db: str) -> None:
    with (
        database(pg_admin_url, template_db) as url,
        running(url, url, RB_SERIALIZER="pickle", C_FORCE_ROOT="1") as (mod, _worker),
    ):
        assert mod.pyobj.delay().get(timeout=T) == {1, 2, 3}
        with pytest.raises(ValueError, match="pickled"):
            mod.fail.delay("pickled").get(timeout=T)
        r = chord(mod.add.s(i, i) for i in range(3))(mod.xsum.s())
        assert r.get(timeout=T) == 6
