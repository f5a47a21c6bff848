"""Round trips of the result backend's hot paths, counted, so that a change
that adds a query per task (or a commit per state) fails here.

The client side (``get()``) is counted at the two places it can talk to
PostgreSQL: the result consumer's LISTEN connection (``_send``,
``_send_read``) and the pool (``_run``, ``_write_result``). The worker side
is counted in commits (sync points of the store pipeline).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from celery import Celery, states
from celery.app.task import Context

from pgbroker.database.sessions import default_application_name
from pgbroker.results import backend as backend_module
from pgbroker.results.backend import PostgresBackend
from pgbroker.results.consumer import channel_for
from tests import pgserver
from tests.celery_helpers import get_waits, wait_until


def make_app(url: str, **conf: Any) -> Celery:
    app = Celery("t", broker="memory://", backend=url, set_as_current=False)
    app.conf.result_extended = True
    app.conf.update(conf)
    return app


@pytest.fixture
def client(db_url: str) -> Iterator[Celery]:
    app = make_app(db_url)
    yield app
    app.backend.result_consumer.stop()
    app.close()


@pytest.fixture
def worker(db_url: str) -> Iterator[PostgresBackend]:
    """A second backend, as a worker process has: it stores, the client waits."""
    app = make_app(db_url)
    yield app.backend
    app.close()


def request(task_id: str, **kw: Any) -> Context:
    fields = dict(
        id=task_id,
        task="x.add",
        args=[1, 2],
        kwargs={"k": "v"},
        hostname="w1",
        retries=0,
        delivery_info={"routing_key": "q1"},
        group=None,
        parent_id=None,
        root_id="root",
    )
    fields.update(kw)
    return Context(**fields)


def count_statements(backend: PostgresBackend, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every statement this backend sends, by where it goes."""
    counts: Counter[str] = Counter()
    consumer = backend.result_consumer
    real_send, real_read = consumer._send, consumer._send_read
    real_run, real_write = backend._run, backend._write_result

    def send(conn: Any, query: Any, tag: object) -> None:
        counts["listen: " + query.as_string(None).split()[0]] += 1
        real_send(conn, query, tag)

    def send_read(conn: Any, task_ids: list[str]) -> None:
        counts["listen: read"] += 1
        real_read(conn, task_ids)

    def run(fn: Any) -> Any:
        counts["pool"] += 1
        return real_run(fn)

    def write(params: dict[str, Any], defer: bool) -> None:
        counts["pool"] += 1
        real_write(params, defer)

    monkeypatch.setattr(consumer, "_send", send)
    monkeypatch.setattr(consumer, "_send_read", send_read)
    monkeypatch.setattr(backend, "_run", run)
    monkeypatch.setattr(backend, "_write_result", write)
    return counts


def store_later(delay: float, fn: Any) -> threading.Thread:
    thread = threading.Timer(delay, fn)
    thread.start()
    return thread


# --- get(): LISTEN and one read, nothing else ----------------------------------------


def test_publishing_sends_nothing_to_the_result_backend(
    client: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """on_task_call used to LISTEN (a round trip before every publish, and
    two statements for a task nobody waits for)."""
    counts = count_statements(client.backend, monkeypatch)
    for _ in range(5):
        client.backend.on_task_call(None, str(uuid.uuid4()))
    assert counts == Counter()


def test_get_of_a_small_result_is_listen_and_one_read(
    client: Celery, worker: PostgresBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The result arrives in the notification: no query to fetch it."""
    client.backend.result_consumer.consume_from("warm-up")
    client.backend.result_consumer.drain_events(timeout=0.2)
    client.backend.result_consumer.drain_events(timeout=0.2)  # opens the connection, LISTENs
    counts = count_statements(client.backend, monkeypatch)
    task_id = str(uuid.uuid4())
    store_later(0.3, lambda: worker.mark_as_done(task_id, {"answer": 42}, request=request(task_id)))
    result = client.AsyncResult(task_id)
    assert result.get(timeout=10) == {"answer": 42}
    assert result.args == [1, 2] and result.kwargs == {"k": "v"}  # extended fields came too
    assert counts == Counter({"listen: LISTEN": 1, "listen: read": 1}), counts


def test_get_of_a_finished_task_is_answered_by_the_read(
    client: Celery, worker: PostgresBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stored before anyone listened: the read after LISTEN finds it."""
    task_id = str(uuid.uuid4())
    worker.mark_as_done(task_id, "done before", request=request(task_id))
    counts = count_statements(client.backend, monkeypatch)
    assert client.AsyncResult(task_id).get(timeout=10) == "done before"
    assert counts["pool"] == 0, counts
    assert counts["listen: read"] == 1, counts


def test_get_of_a_large_result_fetches_it_once(
    client: Celery, worker: PostgresBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Too large for a NOTIFY payload: announced by state, read once."""
    client.backend.result_consumer.consume_from("warm-up")
    client.backend.result_consumer.drain_events(timeout=0.2)  # opens the connection, LISTENs
    counts = count_statements(client.backend, monkeypatch)
    task_id = str(uuid.uuid4())
    big = "x" * 20_000
    store_later(0.3, lambda: worker.mark_as_done(task_id, big, request=request(task_id)))
    assert client.AsyncResult(task_id).get(timeout=10) == big
    assert counts == Counter({"listen: LISTEN": 1, "listen: read": 1, "pool": 1}), counts


@pytest.mark.parametrize("size", [5_000, 5_500, 5_700, 6_000, 7_900, 8_100])
def test_results_near_the_payload_limit(client: Celery, worker: PostgresBackend, size: int) -> None:
    """Around NOTIFY's 8000-byte limit, storing never fails ("payload string
    too long") and get() gets the value, by payload or by a read."""
    task_id = str(uuid.uuid4())
    value = "é" * (size // 2)  # two bytes each in UTF-8
    store_later(0.2, lambda: worker.mark_as_done(task_id, value, request=request(task_id)))
    assert client.AsyncResult(task_id).get(timeout=10) == value


def test_idle_get_sends_no_query_while_it_waits(client: Celery, db: psycopg.Connection) -> None:
    """Counted on the server: the client's sessions run nothing while a
    get() waits for a task that does not finish."""
    task_id = str(uuid.uuid4())
    app_name = default_application_name()
    activity = (
        "SELECT pid, query_start, state_change FROM pg_stat_activity "
        "WHERE application_name = %s AND datname = current_database() ORDER BY pid"
    )
    snapshots: list[list[tuple[Any, ...]]] = []
    errors: list[BaseException] = []
    watched: list[float] = []

    def watch() -> None:
        try:
            # The LISTEN and the read are done (within the get's 2.5 s,
            # leaving room for the window below).
            wait_until(lambda: get_waits(backend, task_id), 0.9, "get() to wait", interval=0.01)
            snapshots.append(db.execute(activity, [app_name]).fetchall())
            time.sleep(1.5)  # on purpose: a window in which no statement may start
            snapshots.append(db.execute(activity, [app_name]).fetchall())
            watched.append(time.monotonic())
        except BaseException as exc:
            errors.append(exc)

    result = client.AsyncResult(task_id)
    backend = result.backend  # (client.backend is one per thread)
    watcher = threading.Thread(target=watch)
    watcher.start()
    with pytest.raises(Exception, match="timed out"):
        result.get(timeout=2.5)
    returned = time.monotonic()
    watcher.join(10)
    assert not errors, errors
    assert watched[0] < returned  # the window was inside the wait
    before, after = snapshots
    assert before, "the client's sessions were not found"
    assert before == after  # no statement started, no state changed


def comparable(meta: dict[str, Any]) -> dict[str, Any]:
    # Exceptions compare by identity: compare their type and arguments.
    return {k: (type(v), v.args) if isinstance(v, BaseException) else v for k, v in meta.items()}


def test_notified_meta_equals_read_meta(client: Celery, worker: PostgresBackend) -> None:
    """What a waiter decodes from a notification is exactly what a read gives."""
    consumer = client.backend.result_consumer
    child = ("c1", None)
    cases: list[tuple[str, Any]] = [
        ("SUCCESS", {"n": 1, "l": [1, 2]}),
        ("FAILURE", ValueError("boom")),
        ("RETRY", RuntimeError("again")),
        ("PROGRESS", {"done": 1, "of": 2}),
        ("REVOKED", None),
        ("STARTED", {"pid": 1, "hostname": "h"}),
    ]
    with psycopg.connect(pgserver.libpq_url(client.conf.result_backend), autocommit=True) as ln:
        for state, value in cases:
            task_id = str(uuid.uuid4())
            ln.execute(f'LISTEN "{channel_for("pgbroker", task_id)}"')
            req = request(task_id, group="g1", parent_id="p1", children=[child])
            if state == "FAILURE":
                worker.mark_as_failure(task_id, value, traceback="Traceback: boom", request=req)
            elif state == "RETRY":
                worker.mark_as_retry(task_id, value, traceback="Traceback: again", request=req)
            elif state == "REVOKED":
                worker.mark_as_revoked(task_id, reason="stop", request=req)
            else:
                worker.store_result(task_id, value, state, request=req)
                worker._settle()  # STARTED is committed with the next state, or later
            payload = next(ln.notifies(timeout=5, stop_after=1)).payload
            got_state, values = consumer._parse(payload)
            assert got_state == state and values is not None, payload
            notified = comparable(consumer._meta(values))
            read = comparable(client.backend.get_task_meta(task_id, cache=False))
            assert notified == read, state
            assert notified["status"] == state
            assert notified["date_done"] == read["date_done"]


# --- the worker: STARTED commits with the next state -----------------------------------


def test_started_and_success_commit_in_one_transaction(
    worker: PostgresBackend, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fast task: one commit (one WAL flush) for STARTED and SUCCESS, and
    a listener still hears both states, in order."""
    monkeypatch.setattr(backend_module, "STARTED_COMMIT_DELAY", 30.0)
    syncs: list[int] = []
    real_sync = backend_module._Pipeline.sync

    def sync(self: Any) -> None:
        syncs.append(1)
        real_sync(self)

    monkeypatch.setattr(backend_module._Pipeline, "sync", sync)
    task_id = str(uuid.uuid4())
    db.execute(f'LISTEN "{channel_for("pgbroker", task_id)}"')
    worker.store_result(task_id, {"pid": 1}, states.STARTED, request=request(task_id))
    # Not committed yet: the row is not there for anyone else.
    assert db.execute("SELECT count(*) FROM pgbroker.task_result").fetchone() == (0,)
    worker.mark_as_done(task_id, 3, request=request(task_id))
    assert db.execute("SELECT state FROM pgbroker.task_result").fetchall() == [("SUCCESS",)]
    heard = [json.loads(n.payload)[1] for n in db.notifies(timeout=5, stop_after=2)]
    assert heard == ["STARTED", "SUCCESS"]
    assert len(syncs) == 1


def test_started_of_a_long_task_is_committed_on_its_own(
    worker: PostgresBackend, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the delay, STARTED is committed by the committer thread, and the
    connection goes back to the pool while the task runs."""
    monkeypatch.setattr(backend_module, "STARTED_COMMIT_DELAY", 0.05)
    task_id = str(uuid.uuid4())
    worker.store_result(task_id, {"pid": 1}, states.STARTED, request=request(task_id))
    deadline = time.monotonic() + 5
    while db.execute("SELECT state FROM pgbroker.task_result").fetchall() != [("STARTED",)]:
        assert time.monotonic() < deadline, "STARTED never committed"
        time.sleep(0.02)
    pool = worker._pool()
    deadline = time.monotonic() + 5
    while pool.get_stats().get("pool_available", 0) < pool.get_stats().get("pool_size", 0):
        assert time.monotonic() < deadline, f"connection not given back: {pool.get_stats()}"
        time.sleep(0.02)
    worker.mark_as_done(task_id, 5, request=request(task_id))
    assert db.execute("SELECT state FROM pgbroker.task_result").fetchall() == [("SUCCESS",)]


def test_a_failed_started_does_not_lose_the_success(
    worker: PostgresBackend,
    db: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """STARTED and SUCCESS share a transaction: when STARTED fails, SUCCESS
    is stored on its own, and the STARTED failure is logged."""
    monkeypatch.setattr(backend_module, "STARTED_COMMIT_DELAY", 30.0)
    task_id = str(uuid.uuid4())
    # Out of an integer's range: this STARTED write fails, in PostgreSQL.
    huge = request(task_id, retries=2**40)
    worker.store_result(task_id, {"pid": 1}, states.STARTED, request=huge)
    with caplog.at_level(logging.WARNING, logger="pgbroker"):
        worker.mark_as_done(task_id, 7, request=request(task_id))
    assert db.execute("SELECT state, name FROM pgbroker.task_result").fetchall() == [
        ("SUCCESS", "x.add")
    ]
    assert "STARTED state failed" in caplog.text


def test_failure_with_nul_in_its_message(client: Celery, worker: PostgresBackend) -> None:
    """The exception comes back exact; its traceback (text) keeps U+0000 as
    the escape \\x00."""
    task_id = str(uuid.uuid4())
    worker.mark_as_failure(
        task_id,
        ValueError("nul:\x00 end"),
        traceback="ValueError: nul:\x00 end",
        request=request(task_id),
    )
    result = client.AsyncResult(task_id)
    with pytest.raises(ValueError) as info:
        result.get(timeout=10)
    assert str(info.value) == "nul:\x00 end"
    assert result.traceback == "ValueError: nul:\\x00 end"


def test_text_with_nul_is_refused_not_cut(worker: PostgresBackend, db: psycopg.Connection) -> None:
    """libpq takes text parameters up to the first NUL: refuse them, as
    psycopg does, rather than store a cut value."""
    task_id = str(uuid.uuid4())
    with pytest.raises(psycopg.DataError, match="NUL"):
        worker.mark_as_done(task_id, 1, request=request(task_id, task="a\0b"))
    assert db.execute("SELECT count(*) FROM pgbroker.task_result").fetchone() == (0,)


def test_success_is_final_within_the_shared_transaction(
    worker: PostgresBackend, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A redelivered task whose SUCCESS is stored: its STARTED and its
    second result change nothing."""
    monkeypatch.setattr(backend_module, "STARTED_COMMIT_DELAY", 30.0)
    task_id = str(uuid.uuid4())
    worker.mark_as_done(task_id, 1, request=request(task_id))
    worker.store_result(task_id, {"pid": 2}, states.STARTED, request=request(task_id))
    worker.mark_as_failure(task_id, ValueError("late"), request=request(task_id))
    assert worker.get_task_meta(task_id, cache=False)["result"] == 1


# --- the result consumer keeps what it consumes ------------------------------------------


def test_task_id_with_nul_is_refused_not_cut(client: Celery, worker: PostgresBackend) -> None:
    """The read after LISTEN must not read task "a" for "a\\0b"."""
    worker.mark_as_done("a", 1, request=request("a"))
    with pytest.raises(psycopg.DataError, match="NUL"):
        client.AsyncResult("a\x00b").get(timeout=2)
