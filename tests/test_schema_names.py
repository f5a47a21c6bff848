"""Schema names of any characters work end to end (transport, NOTIFY wake-ups,
result backend, beat, CLI), or are refused at once, before anything is
created: '%' (psycopg reads it as a placeholder, even inside a quoted
identifier), NUL, and names longer than PostgreSQL's 63 bytes."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import psycopg
import pytest
from celery import Celery
from kombu import Connection, Consumer, Exchange, Producer, Queue

from pgbroker.errors import ConfigurationError
from pgbroker.operations import beat

WORKING = [
    'we"ird',
    "with space",
    "ünïcødé 名前",
    "Upper.Case",
    "x" * 63,
    "é" * 31 + "x",  # 63 bytes
    "semi;colon -- and 'quote'",
    "{schema}",
]
REFUSED = ["100%", "100%%", "a%sb", "%(x)s", "x" * 64, "é" * 32, "nul\0x"]


def _schemas(db: psycopg.Connection) -> set[str]:
    rows = db.execute("SELECT nspname FROM pg_namespace").fetchall()
    return {r[0] for r in rows}


@pytest.mark.parametrize("name", WORKING)
def test_transport_round_trip_woken_by_notify(
    name: str, db_url: str, db: psycopg.Connection
) -> None:
    with Connection(db_url, transport_options={"schema": name}) as conn:
        channel = conn.channel()
        queue = Queue("q", Exchange("ex", type="direct"), routing_key="k")
        queue(channel).declare()
        got: list[Any] = []

        def on_message(body: Any, message: Any) -> None:
            got.append(body)
            message.ack()

        with Consumer(channel, [queue], callbacks=[on_message]):
            # Published by another connection: the consumer learns of it
            # through NOTIFY on the schema's channel.
            with Connection(db_url, transport_options={"schema": name}) as other:
                Producer(other.channel()).publish(
                    {"n": 1}, exchange=queue.exchange, routing_key="k"
                )
            started = time.monotonic()
            conn.drain_events(timeout=5)
            assert time.monotonic() - started < 2  # woken, not polled
        assert got == [{"n": 1}]
    assert name in _schemas(db)


@pytest.mark.parametrize("name", WORKING[:3])
def test_result_backend_and_beat(name: str, db_url: str) -> None:
    app = Celery("names", broker="memory://", backend=db_url, set_as_current=False)
    app.conf.result_backend_transport_options = {"schema": name}
    try:
        app.backend.mark_as_done("t1", 42)
        assert app.backend.get_task_meta("t1")["result"] == 42
        result = app.AsyncResult("t1")
        assert result.get(timeout=5) == 42
    finally:
        app.close()
    beat.add_entry(db_url, "tick", "tasks.tick", 10, schema=name)
    assert [e.name for e in beat.list_entries(db_url, schema=name)] == ["tick"]


@pytest.mark.parametrize("name", REFUSED)
def test_refused_before_anything_is_created(name: str, db_url: str, db: psycopg.Connection) -> None:
    before = _schemas(db)
    with pytest.raises(ConfigurationError, match="'schema' must be a name") as info:
        Connection(db_url, transport_options={"schema": name}).connect()
    assert "1 to 63 bytes" in str(info.value) or "without '%'" in str(info.value)
    app = Celery("names", broker="memory://", backend=db_url, set_as_current=False)
    app.conf.result_backend_transport_options = {"schema": name}
    with pytest.raises(ConfigurationError, match="'schema' must be a name"):
        app.backend.mark_as_done("t1", 42)
    with pytest.raises(ConfigurationError, match="schema must be a name"):
        beat.list_entries(db_url, schema=name)
    if "\0" in name:
        return  # no NUL in a command line
    result = subprocess.run(
        [sys.executable, "-m", "pgbroker", "migrate", "--url", db_url, "--schema", name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--schema must be a name" in result.stderr
    assert _schemas(db) == before
