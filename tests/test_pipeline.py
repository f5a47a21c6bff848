"""pgbroker.database.pipeline against a real PostgreSQL: what the transport's
claim, the backend's writes and the result consumer rely on (replies in the
order sent, errors as psycopg raises them, sync points, non-blocking reads,
a session that ends)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors as pgerrors
from psycopg import pq

from pgbroker.database import pipeline
from pgbroker.errors import ConnectionLost, session_lost
from tests import pgserver

_INT4 = 23


@pytest.fixture
def conn(empty_db_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection in pipeline mode (closed, never committed:
    a test may leave replies unread)."""
    c = psycopg.connect(pgserver.libpq_url(empty_db_url), autocommit=True)
    try:
        pipeline.enter(c)
        yield c
    finally:
        c.close()


@pytest.fixture
def other(empty_db_url: str) -> Iterator[psycopg.Connection]:
    """A second, ordinary session on the same database."""
    with psycopg.connect(pgserver.libpq_url(empty_db_url), autocommit=True) as c:
        yield c


def _replies(conn: psycopg.Connection, syncs: int) -> list[Any]:
    """Every reply up to the ``syncs``-th sync point, as data: per statement
    ("rows", values) / ("error", exc) / ("aborted",) / ("ok",), then "end";
    "sync" for each sync point."""
    out: list[Any] = []
    while syncs:
        res = pipeline.next_result(conn)
        if res is None:
            out.append("end")
        elif pipeline.is_sync(res):
            out.append("sync")
            syncs -= 1
        elif (exc := pipeline.error(conn, res)) is not None:
            out.append(("error", exc))
        elif pipeline.is_aborted(res):
            out.append(("aborted",))
        elif pipeline.has_rows(res):
            values = [res.get_value(row, 0) for row in range(res.ntuples)]
            out.append(("rows", values))
        else:
            out.append(("ok",))
    return out


def test_replies_come_in_the_order_sent(conn: psycopg.Connection) -> None:
    pipeline.prepare(conn, b"plus_one", b"SELECT $1::int + 1", [_INT4])
    pipeline.send_query(conn, b"SELECT 'first'")
    pipeline.send_prepared(conn, b"plus_one", [b"41"])
    pipeline.send_prepared(conn, b"plus_one", [b"\x00\x00\x00\x09"], [1])  # binary 9
    pipeline.sync(conn)
    pipeline.send_query(conn, b"SELECT generate_series(1, 3)")
    pipeline.sync(conn)
    pipeline.flush(conn)
    assert _replies(conn, 2) == [
        ("ok",),  # the prepare
        "end",
        ("rows", [b"first"]),
        "end",
        ("rows", [b"42"]),
        "end",
        ("rows", [b"10"]),
        "end",
        "sync",
        ("rows", [b"1", b"2", b"3"]),
        "end",
        "sync",
    ]
    assert conn.pgconn.transaction_status == pq.TransactionStatus.IDLE
    pipeline.leave(conn)
    assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)


def test_an_error_mid_pipeline_aborts_the_rest_of_its_transaction(
    conn: psycopg.Connection, other: psycopg.Connection
) -> None:
    other.execute("CREATE TABLE t (n int PRIMARY KEY)")
    pipeline.send_query(conn, b"INSERT INTO t VALUES (1)")
    pipeline.send_query(conn, b"SELECT 1 / 0")
    pipeline.send_query(conn, b"INSERT INTO t VALUES (2)")
    pipeline.sync(conn)
    pipeline.flush(conn)
    replies = _replies(conn, 1)
    assert [r if isinstance(r, str) else r[0] for r in replies] == [
        "ok",
        "end",
        "error",
        "end",
        "aborted",
        "end",
        "sync",
    ]
    exc = replies[2][1]
    # The exception execute() raises, with the server's diagnostics.
    with pytest.raises(psycopg.Error) as raised:
        other.execute("SELECT 1 / 0")
    assert type(exc) is type(raised.value) is pgerrors.DivisionByZero
    assert exc.sqlstate == "22012"
    assert exc.diag.message_primary == raised.value.diag.message_primary == "division by zero"
    assert exc.diag.severity == "ERROR"
    # Nothing of the failed transaction committed, the insert before the error included.
    assert other.execute("SELECT count(*) FROM t").fetchone() == (0,)


def test_a_sync_after_an_error_starts_afresh(
    conn: psycopg.Connection, other: psycopg.Connection
) -> None:
    other.execute("CREATE TABLE t (n int PRIMARY KEY)")
    pipeline.prepare(conn, b"insert", b"INSERT INTO t VALUES ($1)", [_INT4])
    pipeline.send_prepared(conn, b"insert", [b"1"])
    pipeline.send_prepared(conn, b"insert", [b"1"])  # a duplicate key
    pipeline.sync(conn)
    pipeline.send_prepared(conn, b"insert", [b"2"])
    pipeline.send_prepared(conn, b"insert", [b"3"])
    pipeline.sync(conn)
    pipeline.flush(conn)
    replies = _replies(conn, 2)
    assert [r if isinstance(r, str) else r[0] for r in replies] == [
        "ok",  # the prepare: its own statement, it stays prepared
        "end",
        "ok",
        "end",
        "error",
        "end",
        "sync",
        "ok",
        "end",
        "ok",
        "end",
        "sync",
    ]
    assert isinstance(replies[4][1], pgerrors.UniqueViolation)
    assert replies[4][1].diag.constraint_name == "t_pkey"
    assert other.execute("SELECT array_agg(n ORDER BY n) FROM t").fetchone() == ([2, 3],)


def test_a_prepare_that_fails_is_a_statement_error(conn: psycopg.Connection) -> None:
    pipeline.prepare(conn, b"bad", b"SELEC 1", [])
    pipeline.sync(conn)
    pipeline.flush(conn)
    replies = _replies(conn, 1)
    assert replies[1:] == ["end", "sync"]
    assert isinstance(replies[0][1], pgerrors.SyntaxError)


def test_reads_without_waiting(conn: psycopg.Connection) -> None:
    """ready/busy/take_result never wait; a flush request gets a
    statement's rows before the slow statement after it has run."""
    # Before anything is sent: libpq may send the queries before flush().
    start = time.monotonic()
    pipeline.send_query(conn, b"SELECT 'now'")
    pipeline.request_flush(conn)
    pipeline.send_query(conn, b"SELECT pg_sleep(1)")
    pipeline.sync(conn)
    pipeline.flush(conn)
    res = pipeline.next_result(conn)
    assert res is not None and res.get_value(0, 0) == b"now"
    assert pipeline.take_result(conn) is None  # the end of its reply: no wait either
    assert time.monotonic() - start < 0.8
    # The sleep's reply is not there yet: nothing blocks.
    checked = time.monotonic()
    assert not pipeline.ready(conn)
    assert pipeline.busy(conn)
    assert time.monotonic() - checked < 0.5
    while not pipeline.ready(conn):
        time.sleep(0.01)
    assert time.monotonic() - start >= 1.0
    res = pipeline.take_result(conn)
    assert res is not None and pipeline.has_rows(res)
    assert pipeline.take_result(conn) is None
    res = pipeline.take_result(conn)
    assert res is not None and pipeline.is_sync(res)
    pipeline.leave(conn)


def test_notifications_arrive_between_replies(
    conn: psycopg.Connection, other: psycopg.Connection
) -> None:
    pipeline.send_query(conn, b"LISTEN pgbroker_test")
    pipeline.sync(conn)
    pipeline.flush(conn)
    assert _replies(conn, 1) == [("ok",), "end", "sync"]
    assert pipeline.notifies(conn) == []
    other.execute("NOTIFY pgbroker_test, 'one'")
    other.execute("NOTIFY pgbroker_test, 'two'")
    deadline = time.monotonic() + 5
    got: list[Any] = []
    while len(got) < 2 and time.monotonic() < deadline:
        pipeline.consume(conn)
        got += pipeline.notifies(conn)
        time.sleep(0.01)
    assert [(n.relname, n.extra) for n in got] == [
        (b"pgbroker_test", b"one"),
        (b"pgbroker_test", b"two"),
    ]
    assert pipeline.alive(conn)


def test_a_terminated_session(conn: psycopg.Connection, other: psycopg.Connection) -> None:
    """pg_terminate_backend while a statement runs: its reply is the
    server's AdminShutdown, then the wait fails as a lost session (which
    the backend retries and the transport reports as ConnectionLost)."""
    pipeline.send_query(conn, b"SELECT pg_sleep(5)")
    pipeline.sync(conn)
    pipeline.flush(conn)
    other.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
    res = pipeline.next_result(conn)
    assert res is not None
    assert isinstance(pipeline.error(conn, res), pgerrors.AdminShutdown)
    with pytest.raises(psycopg.OperationalError) as raised:
        while True:
            pipeline.next_result(conn)
    assert session_lost(raised.value)
    assert not pipeline.alive(conn)


def test_a_closed_connection(conn: psycopg.Connection) -> None:
    conn.close()
    with pytest.raises(psycopg.OperationalError) as raised:
        pipeline.send_query(conn, b"SELECT 1")
    assert session_lost(raised.value)
    assert not pipeline.alive(conn)


def test_a_session_lost_without_an_error_from_libpq(
    conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should libpq mark the session bad while a wait reads nothing, the
    wait ends with ConnectionLost instead of waiting forever."""
    pipeline.send_query(conn, b"SELECT pg_sleep(30)")
    pipeline.sync(conn)
    pipeline.flush(conn)

    class Bad:
        status = psycopg.pq.ConnStatus.BAD

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    real = conn.pgconn
    monkeypatch.setattr(conn, "pgconn", Bad())
    start = time.monotonic()
    with pytest.raises(ConnectionLost):
        pipeline.next_result(conn)
    assert time.monotonic() - start < 5
