"""The result backend in-process, against a real PostgreSQL."""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from celery import Celery, states
from celery.app.task import Context
from celery.exceptions import TimeoutError as ResultTimeout

from pgbroker.errors import ConfigurationError, DatabaseUnavailable, ResultTooLarge
from pgbroker.results.backend import PostgresBackend
from tests import pgserver
from tests.celery_helpers import get_waits, wait_until

#: The apps a test made, closed after it (close_apps).
_made: list[Celery] = []


def make_app(url: str, **conf: Any) -> Celery:
    app = Celery("t", broker="memory://", backend=url, set_as_current=False)
    app.conf.result_extended = True
    app.conf.update(conf)
    _made.append(app)
    return app


@pytest.fixture(autouse=True)
def close_apps() -> Iterator[None]:
    """Close the LISTEN connection of every app the test made: Celery's
    app.close() leaves the result backend's connections open."""
    yield
    while _made:
        app = _made.pop()
        with contextlib.suppress(ConfigurationError):  # a test of a bad option
            app.backend.result_consumer.stop()
        app.close()


@pytest.fixture
def app(db_url: str) -> Iterator[Celery]:
    yield make_app(db_url)


def request(task_id: str, **kw: Any) -> Context:
    fields = dict(
        id=task_id,
        task="x.add",
        args=[1, 2],
        kwargs={},
        hostname="w1",
        retries=0,
        delivery_info={"routing_key": "q1"},
        group=None,
        parent_id=None,
        root_id="root",
    )
    fields.update(kw)
    return Context(**fields)


def test_entry_points_resolve_every_scheme(db_url: str) -> None:
    from celery.app.backends import by_url

    for scheme in ("postgresql", "postgres", "pgbroker"):
        cls, _ = by_url(f"{scheme}://u@h/db")
        assert cls is PostgresBackend


def test_success_is_never_overwritten(app: Celery, db: psycopg.Connection) -> None:
    b = app.backend
    b.mark_as_done("t1", 42, request=request("t1"))
    b.mark_as_failure("t1", ValueError("late duplicate"), request=request("t1"))
    b.mark_as_started("t1", pid=1)
    assert b.get_task_meta("t1", cache=False)["result"] == 42
    row = db.execute("SELECT state, root_id, queue FROM pgbroker.task_result").fetchall()
    assert row == [("SUCCESS", "root", "q1")]


def test_redelivered_write_leaves_one_row(app: Celery, db: psycopg.Connection) -> None:
    b = app.backend
    b.mark_as_failure("t1", ValueError("first run"), traceback="tb1", request=request("t1"))
    b.mark_as_done("t1", 7, request=request("t1"))
    b.mark_as_done("t1", 8, request=request("t1"))
    rows = db.execute("SELECT state, traceback FROM pgbroker.task_result").fetchall()
    assert rows == [("SUCCESS", None)]
    assert b.get_task_meta("t1", cache=False)["result"] == 7


def test_every_state_round_trips(app: Celery) -> None:
    b = app.backend
    assert b.get_task_meta("none")["status"] == states.PENDING
    assert not b.task_result_exists("none")
    b.store_result("r", None, states.RECEIVED)
    assert b.get_state("r") == states.RECEIVED
    b.mark_as_retry("r", RuntimeError("again"), traceback="tb")
    meta = b.get_task_meta("r", cache=False)
    assert meta["status"] == states.RETRY and isinstance(meta["result"], RuntimeError)
    b.store_result("r", {"step": 3}, "PROGRESS")
    assert b.get_task_meta("r", cache=False)["result"] == {"step": 3}
    b.mark_as_revoked("r", reason="stop")
    assert b.get_state("r") == states.REVOKED
    assert b.task_result_exists("r")
    b.forget("r")
    assert not b.task_result_exists("r")


def test_result_too_large_is_an_encode_error(db_url: str) -> None:
    from kombu.exceptions import EncodeError

    app = make_app(db_url, result_backend_transport_options={"max_result_size": 100})
    with pytest.raises(ResultTooLarge, match="max_result_size") as info:
        app.backend.mark_as_done("big", "x" * 1000)
    assert isinstance(info.value, EncodeError)
    assert not app.backend.task_result_exists("big")


def test_unknown_option_is_an_error(db_url: str) -> None:
    app = make_app(db_url, result_backend_transport_options={"shema": "x"})
    with pytest.raises(ConfigurationError, match="Did you mean 'schema'"):
        app.backend  # noqa: B018


def test_custom_schema_is_created(db_url: str, db: psycopg.Connection) -> None:
    app = make_app(db_url, result_backend_transport_options={"schema": "my results"})
    app.backend.mark_as_done("t", 1)
    assert db.execute('SELECT state FROM "my results".task_result').fetchone() == ("SUCCESS",)


def test_connection_error_is_clear_and_hides_password(pg_admin_url: str) -> None:
    url = "postgresql://postgres:s3cret@127.0.0.1:1/nowhere"
    app = make_app(url)
    with pytest.raises(DatabaseUnavailable) as info:
        app.backend.get_task_meta("x")
    assert "s3cret" not in str(info.value)
    assert "is PostgreSQL running" in str(info.value)
    assert "s3cret" not in app.backend.as_uri()


def test_chord_part_counted_once_and_fires_once(app: Celery, db: psycopg.Connection) -> None:
    b = app.backend
    fired: list[Any] = []
    b._fire_chord = lambda conn, req, gid, header: fired.append(gid)
    b.apply_chord(("g1", []), None)
    parts = [request(f"h{i}", group="g1", group_index=i, chord={"task": "body"}) for i in range(3)]
    b.set_chord_size("g1", 3)
    b.on_chord_part_return(parts[0], states.SUCCESS, 1)
    b.on_chord_part_return(parts[0], states.SUCCESS, 1)  # redelivered
    b.on_chord_part_return(parts[1], states.SUCCESS, 2)
    assert fired == []
    b.on_chord_part_return(parts[2], states.SUCCESS, 3)
    b.on_chord_part_return(parts[2], states.SUCCESS, 3)  # late duplicate
    assert fired == ["g1"]
    assert db.execute("SELECT done, fired FROM pgbroker.chord").fetchone() == (3, True)


def test_concurrent_last_parts_fire_once(db_url: str) -> None:
    app = make_app(db_url)
    fired: list[str] = []
    lock = threading.Lock()

    def part(i: int) -> None:
        b = app.backend  # one backend per thread, as Celery does

        def fire(conn: Any, req: Any, gid: str, header: Any) -> None:
            with lock:
                fired.append(gid)

        b._fire_chord = fire
        b.on_chord_part_return(
            request(f"h{i}", group="g2", group_index=i, chord={"task": "b"}),
            states.SUCCESS,
            i,
        )

    app.backend.apply_chord(("g2", []), None)
    app.backend.set_chord_size("g2", 8)
    threads = [threading.Thread(target=part, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert fired == ["g2"]


def test_expired_results_groups_and_chords_are_removed(db_url: str, db: psycopg.Connection) -> None:
    app = make_app(
        db_url, result_expires=5, result_backend_transport_options={"cleanup_interval": 0.2}
    )
    b = app.backend
    b.mark_as_done("old", 1)
    app.GroupResult("gold", [app.AsyncResult("old")]).save(backend=b)
    b.apply_chord(("cold", []), None)
    db.execute("UPDATE pgbroker.task_result SET updated_at = now() - interval '1 minute'")
    db.execute("UPDATE pgbroker.group_result SET date_done = now() - interval '1 minute'")
    db.execute("UPDATE pgbroker.chord SET updated_at = now() - interval '1 minute'")
    b.mark_as_done("new", 2)  # starts the expiry thread (it does not delete on this path)
    ids = [r[0] for r in db.execute("SELECT task_id FROM pgbroker.task_result ORDER BY 1")]
    assert ids == ["new", "old"]

    # With no further activity, the thread's passes (every 0.2 s) remove them.
    # A pass deletes each table's batch in turn: wait for all three.
    def left() -> tuple[list[str], int, int]:
        ids = [r[0] for r in db.execute("SELECT task_id FROM pgbroker.task_result")]
        groups = db.execute("SELECT count(*) FROM pgbroker.group_result").fetchone()
        chords = db.execute("SELECT count(*) FROM pgbroker.chord").fetchone()
        return ids, groups[0] if groups else -1, chords[0] if chords else -1

    started = time.monotonic()
    while time.monotonic() - started < 4.0 and left() != (["new"], 0, 0):
        time.sleep(0.05)
    assert left() == (["new"], 0, 0)


def test_an_expired_result_reads_pending_with_no_other_activity(
    db_url: str, db: psycopg.Connection
) -> None:
    """As on Redis, whose key would be gone: past result_expires, a result
    (and a saved group) reads as missing, deleted or not."""
    app = make_app(
        db_url, result_expires=1, result_backend_transport_options={"cleanup_interval": 0}
    )
    app.backend.mark_as_done("short", 42)
    app.GroupResult("gshort", [app.AsyncResult("short")]).save()
    reader = make_app(db_url, result_expires=1).backend
    assert reader.get_task_meta("short")["status"] == states.SUCCESS
    time.sleep(2.0)  # on purpose: result_expires (1 s) elapses
    reader = make_app(db_url, result_expires=1).backend  # nothing cached
    assert reader.get_task_meta("short")["status"] == states.PENDING
    assert app.AsyncResult("short", backend=reader).state == states.PENDING
    assert reader.get_metas(["short"]) == []
    assert not reader.task_result_exists("short")
    assert reader.restore_group("gshort") is None
    # Still in the table (nothing deleted it: no thread, no sweeper here).
    assert db.execute("SELECT count(*) FROM pgbroker.task_result").fetchone() == (1,)


def test_store_result_never_deletes_and_cleanup_deletes_one_batch(
    db_url: str, db: psycopg.Connection
) -> None:
    """Expiry is off the task's path: storing a result deletes nothing,
    whatever the backlog, and each expiry pass deletes one batch."""
    from pgbroker.results.backend import CLEANUP_BATCH

    db.execute(
        "INSERT INTO pgbroker.task_result (task_id, state, content_type, content_encoding, "
        "updated_at) SELECT 'old' || i, 'SUCCESS', 'application/json', 'utf-8', "
        "now() - interval '1 hour' FROM generate_series(1, %s) i",
        [CLEANUP_BATCH * 2 + 500],
    )
    app = make_app(
        db_url, result_expires=60, result_backend_transport_options={"cleanup_interval": 3600}
    )
    b = app.backend
    b.mark_as_done("new", 1)
    count = "SELECT count(*) FROM pgbroker.task_result"
    assert db.execute(count).fetchone() == (CLEANUP_BATCH * 2 + 501,)
    assert b.cleanup() == CLEANUP_BATCH
    assert db.execute(count).fetchone() == (CLEANUP_BATCH + 501,)


def test_backend_cleanup_task_path(db_url: str, db: psycopg.Connection) -> None:
    app = make_app(
        db_url, result_expires=60, result_backend_transport_options={"cleanup_interval": 0}
    )
    b = app.backend
    assert not b.supports_autoexpire  # beat's celery.backend_cleanup does it
    b.mark_as_done("a", 1)
    db.execute("UPDATE pgbroker.task_result SET updated_at = now() - interval '2 minutes'")
    b.mark_as_done("b", 1)
    assert db.execute("SELECT count(*) FROM pgbroker.task_result").fetchone() == (2,)
    b.cleanup()
    assert db.execute("SELECT task_id FROM pgbroker.task_result").fetchall() == [("b",)]


def test_get_is_woken_by_notify(app: Celery) -> None:
    b = app.backend
    b.on_task_call(None, "w1")  # LISTEN, as apply_async does
    threading.Timer(
        0.3, lambda: make_app(app.conf.result_backend).backend.mark_as_done("w1", "woken")
    ).start()
    started = time.monotonic()
    assert app.AsyncResult("w1").get(timeout=10) == "woken"
    assert time.monotonic() - started < 2


def test_a_waiting_get_rides_out_a_database_gone_for_a_while(
    app: Celery, db: psycopg.Connection, pg_admin_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The waiter's session ends and the database refuses connections for
    two seconds (as in a failover, before the new primary takes writes):
    the waiting get() keeps trying and returns the result stored after.
    (It raised Celery's "Retry limit exceeded ... must be restarted" at the
    first refused connection; found under Patroni.)"""
    dbname = db.info.dbname
    waited: list[Any] = []

    def wait() -> None:
        try:
            waited.append(app.AsyncResult("gone-a-while").get(timeout=30))
        except BaseException as exc:  # reported below
            waited.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    others = (
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid()"
    )
    wait_until(lambda: bool(db.execute(others).fetchall()), 10, "the get() to connect")
    time.sleep(0.5)  # its LISTEN and first read done
    # The test's own database: refused from the server's admin database.
    with psycopg.connect(pgserver.libpq_url(pg_admin_url), autocommit=True) as admin:
        try:
            admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
            db.execute(f"SELECT pg_terminate_backend(pid) FROM ({others}) o")
            time.sleep(2)
        finally:
            admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
    make_app(app.conf.result_backend).backend.mark_as_done("gone-a-while", "still there")
    waiter.join(30)
    assert waited == ["still there"]
    assert "trying again" in caplog.text


def test_get_raises_a_parents_failure_stored_during_its_first_check(app: Celery) -> None:
    """AsyncResult.get() of a chain's last link raises a failed parent's
    error (follow_parents): it checks the parents once, then through
    on_interval after each wait. Here the worker ends the chain between that
    first check and the first look at the link's own state: the parent
    fails, and the link is failed by it (as a chord body gets ChordError).
    The parent's error must win, as when get() has to wait (Celery's
    test_chord_error_propagation_with_different_body_types)."""
    b = app.backend
    worker = make_app(app.conf.result_backend).backend

    class FailsAfterFirstLook(type(app.AsyncResult("x"))):  # type: ignore[misc]
        looks = 0

        def maybe_throw(self, *args: Any, **kwargs: Any) -> Any:
            FailsAfterFirstLook.looks += 1
            value = super().maybe_throw(*args, **kwargs)  # PENDING: nothing to raise
            if FailsAfterFirstLook.looks == 1:
                worker.mark_as_failure("parent-1", KeyError("the parent's"))
                worker.mark_as_failure("link-1", ValueError("the link's"))
            return value

    parent = FailsAfterFirstLook("parent-1", backend=b, app=app)
    link = app.AsyncResult("link-1", parent=parent)
    with pytest.raises(KeyError, match="the parent's"):
        link.get(timeout=10)


def test_threads_share_a_thread_safe_backend(db_url: str) -> None:
    app = make_app(db_url, result_backend_thread_safe=True)
    writer = make_app(db_url).backend
    ids = [f"t{i}" for i in range(6)]
    for task_id in ids:
        app.backend.on_task_call(None, task_id)
    got: dict[str, Any] = {}

    def wait(task_id: str) -> None:
        got[task_id] = app.AsyncResult(task_id).get(timeout=15)

    threads = [threading.Thread(target=wait, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    wait_until(
        lambda: get_waits(app.backend, *ids), 15, "every thread's get() to wait for its NOTIFY"
    )
    for task_id in ids:
        writer.mark_as_done(task_id, task_id.upper())
    for t in threads:
        t.join(20)
    assert got == {i: i.upper() for i in ids}


def test_fork_child_does_not_break_parent_connections(app: Celery) -> None:
    b = app.backend
    b.mark_as_done("before", 1)
    b.on_task_call(None, "after-fork")  # parent's LISTEN connection exists
    pid = os.fork()
    if pid == 0:  # child: use the backend, then exit without cleanup
        code = 1
        try:
            child = app.backend
            child.mark_as_done("child", os.getpid())
            child.result_consumer.consume_from("in-child")  # replaces the LISTEN conn
            gc.collect()  # finalise whatever the child dropped from the parent
            code = 0 if child.get_task_meta("before", cache=False)["result"] == 1 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's pooled and LISTEN connections still work.
    assert b.get_task_meta("child", cache=False)["status"] == states.SUCCESS
    make_app(app.conf.result_backend).backend.mark_as_done("after-fork", "ok")
    assert app.AsyncResult("after-fork").get(timeout=10) == "ok"


def _stored_group(app: Celery, n: int) -> tuple[str, list[str]]:
    writer = make_app(app.conf.result_backend).backend
    ids = [f"g-{i}" for i in range(n)]
    for i, task_id in enumerate(ids):
        writer.mark_as_done(task_id, i * 2)
    return "g", ids


def test_group_whose_parts_are_ready_while_it_is_built(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every part fulfilled while the GroupResult is constructed: it still joins.

    The interleaving of a loaded machine, forced: each part's LISTEN and read
    go out and are answered before ``add_pending_result`` returns (as when
    another thread's wait sends them), so each part is fulfilled before
    vine's barrier is finalised, and the barrier (built from
    already-fulfilled promises) never fires on its own.
    """
    _, ids = _stored_group(app, 5)
    consumer = app.backend.result_consumer
    consume_from = type(consumer).consume_from

    def consume_and_deliver(self: Any, task_id: str) -> None:
        consume_from(self, task_id)
        self._step(0)  # sends the LISTEN and the read
        self._wait_synced(self._sent)  # the server answered at once

    monkeypatch.setattr(type(consumer), "consume_from", consume_and_deliver)
    g = app.GroupResult("g", [app.AsyncResult(i) for i in ids])
    assert all(r.ready() for r in g.results)
    assert g.get(timeout=10) == [i * 2 for i in range(5)]
    assert g.ready()


def test_group_whose_parts_are_buffered_joins(app: Celery) -> None:
    """Parts already in Celery's message buffer (a late duplicate
    notification) are fulfilled as the group is built: it still joins."""
    _, ids = _stored_group(app, 5)
    backend = app.backend
    for task_id in ids:
        backend.result_consumer.on_state_change(backend.get_task_meta(task_id), None)
    g = app.GroupResult("g", [app.AsyncResult(i) for i in ids])
    assert g.get(timeout=10) == [i * 2 for i in range(5)]


@pytest.mark.parametrize("late", ["buffered", "unread"])
def test_a_forgotten_results_late_notification_never_answers_its_id_used_again(
    late: str, app: Celery, db: psycopg.Connection
) -> None:
    """A task id used again after ``forget()`` waits for its new result.

    The first result can reach the client twice (the read after the LISTEN
    and the NOTIFY both bring it when the worker commits in between): the
    second copy lands in Celery's message buffer, or is still on the socket
    (or at the server) when ``forget()`` runs. Either way it must not answer
    the next wait on that id, as it did once in CI (test_republish's
    ``add`` gave 3, the forgotten result, for its second run).
    """
    b = app.backend
    first = app.AsyncResult("again")
    b.mark_as_done("again", 3, request=request("again"))
    assert first.get(timeout=10) == 3
    if late == "buffered":
        # What the consumer does with the copy nobody waits for any more.
        b.result_consumer.on_state_change(b.get_task_meta("again", cache=False), None)
        assert "again" in b._pending_messages
    else:
        # A second notification of the same result, as the worker's commit
        # sends it; the channel is still listened (UNLISTENs are lazy).
        db.execute("UPDATE pgbroker.task_result SET state = 'STARTED' WHERE task_id = 'again'")
        b.mark_as_done("again", 3, request=request("again"))
    first.forget()
    again = app.AsyncResult("again")
    with pytest.raises(ResultTimeout):
        again.get(timeout=1)
    make_app(app.conf.result_backend).backend.mark_as_done("again", 5, request=request("again"))
    assert again.get(timeout=10) == 5
