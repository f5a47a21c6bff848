"""A chord's header and its chord row, sent in one transaction
(pgbroker/broker/header.py).

Celery sends the chord row, each header task and the chord's size on their
own: 102 durable commits for a chord of 100. With pgbroker as broker and
result backend in one schema, a header whose parts are single tasks is one
commit, and a header that stops being sent (an error raised to the caller)
writes nothing. The first test fails if the parts commit one by one again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from celery import Celery, chain, chord, group
from kombu.exceptions import EncodeError

from pgbroker.database.pools import close_app
from tests.commit_log import durable_commits, record_durable_commits


@pytest.fixture
def app(db_url: str) -> Iterator[Celery]:
    app = Celery("t", broker=db_url, backend=db_url, set_as_current=False)
    app.conf.broker_connection_retry_on_startup = False
    yield app
    app.backend.result_consumer.stop()
    close_app(app)


def tasks(app: Celery) -> tuple[Any, Any]:
    @app.task(shared=False, name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(shared=False, name="t.tsum")
    def tsum(values: list[int]) -> int:
        return sum(values)

    return add, tsum


def messages_of(db: psycopg.Connection) -> list[tuple[str, str | None]]:
    """(task name, group id) of each message, in publish order."""
    rows = db.execute(
        "SELECT headers->>'task', headers->>'group' FROM pgbroker.message ORDER BY id"
    ).fetchall()
    return [(task, group_id) for task, group_id in rows]


def warm_up(app: Celery, db: psycopg.Connection, add: Any) -> None:
    """A first publish declares the queue and its binding (commits of their
    own); then the commit log starts."""
    add.delay(0, 0)
    db.execute("DELETE FROM pgbroker.message")
    record_durable_commits(db)


def test_a_chord_of_100_is_one_commit_with_its_chord_row(
    app: Celery, db_url: str, db: psycopg.Connection
) -> None:
    add, tsum = tasks(app)
    warm_up(app, db, add)
    result = chord([add.s(i, i) for i in range(100)], tsum.s()).apply_async()
    group_id = result.parent.id
    assert durable_commits(db_url) == ["INSERT chord"]
    assert messages_of(db) == [("t.add", group_id)] * 100
    assert db.execute(
        "SELECT size, done, fired FROM pgbroker.chord WHERE group_id = %s", (group_id,)
    ).fetchone() == (100, 0, False)


def test_a_group_in_a_header_is_flattened_into_it_and_still_one_commit(
    app: Celery, db_url: str, db: psycopg.Connection
) -> None:
    add, tsum = tasks(app)
    warm_up(app, db, add)
    header = [group(add.s(1, 1), add.s(2, 2)), add.s(3, 3)]
    result = chord(header, tsum.s()).apply_async()
    assert durable_commits(db_url) == ["INSERT chord"]
    assert messages_of(db) == [("t.add", result.parent.id)] * 3


@pytest.mark.parametrize("kind", ["chain", "chord"])
def test_a_header_with_a_chain_or_a_chord_is_sent_as_before(
    app: Celery, db: psycopg.Connection, kind: str
) -> None:
    """Such parts send more than one message, or none of the header's
    group: the chord row, each message and the size commit on their own."""
    add, tsum = tasks(app)
    warm_up(app, db, add)
    nested = chain(add.s(1, 1), add.s(2)) if kind == "chain" else chord([add.s(1, 1)], tsum.s())
    result = chord([nested, add.s(3, 3)], tsum.s()).apply_async()
    assert len(messages_of(db)) == 2
    assert db.execute(
        "SELECT size FROM pgbroker.chord WHERE group_id = %s", (result.parent.id,)
    ).fetchone() == (2,)


def test_a_header_that_fails_midway_writes_nothing(
    app: Celery, db_url: str, db: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    add, tsum = tasks(app)
    warm_up(app, db, add)
    unserialisable = object()
    with pytest.raises(EncodeError):
        chord([add.s(1, 1), add.s(unserialisable, 1), add.s(3, 3)], tsum.s()).apply_async()
    assert durable_commits(db_url) == []
    assert messages_of(db) == []
    # The next chord of this thread drops what was held, unsent, and says so.
    with caplog.at_level(logging.WARNING, logger="pgbroker.broker"):
        result = chord([add.s(5, 5)], tsum.s()).apply_async()
    assert "its header stopped being sent after 1 of its tasks" in caplog.text
    assert messages_of(db) == [("t.add", result.parent.id)]
    assert db.execute("SELECT count(*) FROM pgbroker.chord").fetchone() == (1,)
