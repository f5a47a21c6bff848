"""The broker's recovery actions are logged on ``pgbroker.broker``, a child of
``pgbroker``, with structured fields (pgbroker/logs.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import psycopg
import pytest
from kombu import Connection, Consumer, Message, Queue

from tests.kombu_helpers import collect, drain_until, wait_for
from tests.test_sweeper import kill, publish, start_consumer

REQUEUED = "requeued 3 message(s) held by consumers whose sessions ended"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def pgbroker_records() -> Iterator[list[logging.LogRecord]]:
    """What a handler on the ``pgbroker`` logger (as an application sets
    up) receives, at INFO and above."""
    handler = _Records()
    parent = logging.getLogger("pgbroker")
    level = parent.level
    parent.addHandler(handler)
    parent.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        parent.removeHandler(handler)
        parent.setLevel(level)


def _requeues(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if getattr(r, "pgbroker_action", None) == "requeue"]


def _check_requeue_record(record: logging.LogRecord) -> None:
    assert record.name == "pgbroker.broker"
    assert record.levelno == logging.WARNING
    assert record.getMessage() == REQUEUED
    assert record.__dict__["count"] == 3
    assert record.__dict__["reason"] == "consumer session ended"


def test_the_sweep_logs_the_requeue_of_a_sigkilled_consumer_with_its_fields(
    db_url: str, db: psycopg.Connection, pgbroker_records: list[logging.LogRecord]
) -> None:
    """The periodic sweep (no sweeper thread anywhere) requeues the messages
    of a SIGKILLed consumer: one WARNING on pgbroker.broker, seen by the
    handlers of pgbroker, with pgbroker_action, count and reason."""
    publish(db_url, "work", 3)
    with start_consumer(db_url, "work", HOLD="3", PREFETCH="3", FAST_RECOVERY="0") as holder:
        assert holder.read_line() == "held 0 1 2"
        kill(holder)
    with Connection(db_url, transport_options={"fast_recovery": False}) as conn:
        conn.connect()
        conn.transport._ensure_consumer()
        requeued = [0]

        def swept_all() -> bool:
            requeued[0] += conn.transport.sweep()[0]
            return requeued[0] >= 3

        wait_for(swept_all, 15, interval=0.1)
    assert requeued == [3]
    records = _requeues(pgbroker_records)
    assert len(records) == 1, [r.getMessage() for r in pgbroker_records]
    _check_requeue_record(records[0])


def test_the_sweeper_thread_logs_the_requeue_of_a_sigkilled_consumer_with_its_fields(
    db_url: str, db: psycopg.Connection, pgbroker_records: list[logging.LogRecord]
) -> None:
    """Likewise when this process's sweeper thread (fast_recovery) sweeps
    as soon as the consumer's session ends."""
    with Connection(db_url) as conn:
        got: list[Message] = []
        Consumer(conn, [Queue("idle")], callbacks=[collect(got)]).consume()
        drain_until(conn, lambda: conn.transport._sweeper is not None, timeout=5)
        own = conn.transport._sweeper
        assert own is not None
        wait_for(lambda: own.is_sweeper, 15)
        publish(db_url, "work", 3)
        with start_consumer(db_url, "work", HOLD="3", PREFETCH="3") as holder:
            assert holder.read_line() == "held 0 1 2"
            Consumer(conn, [Queue("work")], callbacks=[collect(got)]).consume()
            kill(holder)
            drain_until(conn, lambda: len(got) == 3, timeout=20)
    records = _requeues(pgbroker_records)
    assert sum(r.__dict__["count"] for r in records) == 3, [r.getMessage() for r in records]
    for record in records:
        assert record.name == "pgbroker.broker"
        assert record.levelno == logging.WARNING
        assert record.__dict__["reason"] == "consumer session ended"
