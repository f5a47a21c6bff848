"""Statements the result consumer's session sends, counted where they leave
the consumer (its send calls on its LISTEN connection), so that a change
that brings back a statement or a transaction per waited task fails here.

A wait on N tasks costs N LISTENs in one transaction, then one read of all
their rows in a second one; finished tasks are UNLISTENed in bulk.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from celery import Celery
from celery.result import ResultSet

from pgbroker.results import consumer as result_consumer
from pgbroker.results.backend import PostgresBackend
from tests.celery_helpers import get_waits, wait_until
from tests.test_perf_results import make_app, request


@pytest.fixture
def client(db_url: str) -> Iterator[Celery]:
    app = make_app(db_url)
    yield app
    app.backend.result_consumer.stop()
    app.close()


@pytest.fixture
def worker(db_url: str) -> Iterator[PostgresBackend]:
    app = make_app(db_url)
    yield app.backend
    app.close()


def count_sent(client: Celery, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Open the consumer's connection, then count what it sends: the
    consumer's three send calls are the only ones on that connection."""
    consumer = client.backend.result_consumer
    with consumer._lock:
        consumer._conn()
    counts: Counter[str] = Counter()
    real_send, real_read, real_sync = consumer._send, consumer._send_read, consumer._sync

    def send(conn: Any, query: Any, tag: object) -> None:
        text = query.as_string(conn)
        counts["UNLISTEN *" if text == "UNLISTEN *" else text.split()[0]] += 1
        real_send(conn, query, tag)

    def send_read(conn: Any, task_ids: list[str]) -> None:
        counts["read"] += 1
        real_read(conn, task_ids)

    def sync(conn: Any) -> None:
        counts["transactions"] += 1
        real_sync(conn)

    monkeypatch.setattr(consumer, "_send", send)
    monkeypatch.setattr(consumer, "_send_read", send_read)
    monkeypatch.setattr(consumer, "_sync", sync)
    return counts


def store(worker: PostgresBackend, task_ids: list[str]) -> None:
    for task_id in task_ids:
        worker.mark_as_done(task_id, task_id[:8], request=request(task_id))


class StoreWhenWaited(threading.Thread):
    """Stores the results of ``task_ids`` once a get() waits for them (their
    LISTENs and the read after them are done): they arrive by NOTIFY."""

    def __init__(self, client: Celery, worker: PostgresBackend, task_ids: list[str]) -> None:
        super().__init__()
        self.backend = client.backend  # the caller's (one per thread)
        self.worker, self.task_ids = worker, task_ids
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            wait_until(lambda: get_waits(self.backend, *self.task_ids), 10, "the get() to wait")
            store(self.worker, self.task_ids)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float | None = 30) -> None:
        super().join(timeout)
        assert self.error is None, self.error


def test_result_set_get_is_one_listen_per_task_and_one_read(
    client: Celery, worker: PostgresBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Used to be a LISTEN, a read and an UNLISTEN per task, each its own
    transaction: 3 statements per task."""
    counts = count_sent(client, monkeypatch)
    ids = [str(uuid.uuid4()) for _ in range(60)]
    store(worker, ids[:30])  # before the wait: found by the read
    later = StoreWhenWaited(client, worker, ids[30:])  # notified
    results = ResultSet([client.AsyncResult(task_id) for task_id in ids], app=client)
    assert results.get(timeout=20) == [task_id[:8] for task_id in ids]
    later.join()
    assert counts == Counter({"LISTEN": 60, "read": 1, "transactions": 2}), counts


def test_sequential_gets_unlisten_in_bulk(
    client: Celery, worker: PostgresBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The latency path: LISTEN and read per get(), and one UNLISTEN * per
    STALE_MAX finished tasks instead of an UNLISTEN each."""
    monkeypatch.setattr(result_consumer, "STALE_MAX", 3)
    counts = count_sent(client, monkeypatch)
    ids = [str(uuid.uuid4()) for _ in range(7)]
    store(worker, ids)
    for task_id in ids:
        assert client.AsyncResult(task_id).get(timeout=10) == task_id[:8]
    # The 4th and 7th get() find 3 stale channels: UNLISTEN * goes with their LISTEN.
    assert counts == Counter({"LISTEN": 7, "read": 7, "UNLISTEN *": 2, "transactions": 14}), counts


def test_a_bulk_unlisten_keeps_the_live_channels(
    client: Celery, worker: PostgresBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """UNLISTEN * drops the finished tasks' channels while one task is still
    waited for: its channel is LISTENed again in the same transaction, so
    its result, stored after the read, still arrives."""
    monkeypatch.setattr(result_consumer, "STALE_MAX", 2)
    counts = count_sent(client, monkeypatch)
    waited, *done = (str(uuid.uuid4()) for _ in range(5))
    store(worker, done)
    later = StoreWhenWaited(client, worker, [waited])
    ids = [waited, *done]
    results = ResultSet([client.AsyncResult(task_id) for task_id in ids], app=client)
    assert results.get(timeout=10) == [task_id[:8] for task_id in ids]
    later.join()
    # 4 stale channels against 1 live one (STALE_RATIO 4): reset, waited LISTENed again.
    assert counts == Counter({"LISTEN": 6, "read": 1, "UNLISTEN *": 1, "transactions": 3}), counts
    consumer = client.backend.result_consumer
    assert not consumer._stale


def test_a_wait_survives_its_session_terminated(
    client: Celery, worker: PostgresBackend, db: psycopg.Connection
) -> None:
    """The LISTEN session dies in the middle of a ResultSet.get(): the
    consumer reconnects, LISTENs to the channels still waited for and reads
    them, and the results stored meanwhile and after arrive."""
    ids = [str(uuid.uuid4()) for _ in range(10)]
    store(worker, ids[:5])
    backend = client.backend  # (one per thread)
    consumer = backend.result_consumer
    terminated: list[int] = []
    errors: list[BaseException] = []

    def reconnected() -> bool:
        with consumer._lock:
            conn = consumer._connection
            return conn is not None and conn.info.backend_pid != terminated[0]

    def terminate_then_store() -> None:
        try:
            # The get() waits for the five results not stored yet.
            wait_until(lambda: get_waits(backend, *ids[5:]), 10, "the get() to wait")
            with consumer._lock:
                terminated.append(consumer._connection.info.backend_pid)
            db.execute("SELECT pg_terminate_backend(%s)", terminated)
            store(worker, ids[5:8])  # while no session listens
            wait_until(reconnected, 10, "the consumer to reconnect")
            store(worker, ids[8:])  # after the reconnect (its LISTENs may still be on the way)
        except BaseException as exc:
            errors.append(exc)

    later = threading.Thread(target=terminate_then_store)
    later.start()
    results = ResultSet([client.AsyncResult(task_id) for task_id in ids], app=client)
    try:
        assert results.get(timeout=20) == [task_id[:8] for task_id in ids]
    finally:
        later.join(30)
    assert not errors, errors
    assert terminated
    assert consumer._connection is not None
    assert consumer._connection.info.backend_pid != terminated[0]


def test_group_whose_parts_are_read_while_it_is_built(
    client: Celery, worker: PostgresBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read is deferred to the wait, but another thread's drain_events
    may send and deliver it while a GroupResult is being built (forced
    here): every part is fulfilled before vine's barrier is finalised, and
    the group must still join (``_fire_if_complete``)."""
    ids = [str(uuid.uuid4()) for _ in range(5)]
    store(worker, ids)
    consumer = client.backend.result_consumer
    consume_from = type(consumer).consume_from

    def consume_and_deliver(self: Any, task_id: str) -> None:
        consume_from(self, task_id)
        self._step(0)  # sends the LISTEN and the read
        self._wait_synced(self._sent)  # the server answered at once

    monkeypatch.setattr(type(consumer), "consume_from", consume_and_deliver)
    group = client.GroupResult(str(uuid.uuid4()), [client.AsyncResult(i) for i in ids])
    assert all(r._cache for r in group.results)  # fulfilled while it was built
    assert group.get(timeout=5) == [task_id[:8] for task_id in ids]
