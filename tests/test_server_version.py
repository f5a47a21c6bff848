"""A PostgreSQL server older than pgbroker supports is refused at connect,
with an error that names its version, the minimum and the fix
(pgbroker.database.sessions.MINIMUM_SERVER_VERSION), before any statement
of pgbroker's runs on it; not retried as a lost connection.

This machine has no server older than the minimum, so the connection tests
raise the minimum above the real server's version instead.
"""

from __future__ import annotations

import uuid

import kombu
import psycopg
import pytest

from pgbroker.database import sessions
from pgbroker.errors import CONNECTION_ERRORS, UnsupportedServer
from tests.celery_helpers import execute, wait_until, with_password


def test_an_old_version_is_refused_with_the_fix() -> None:
    with pytest.raises(UnsupportedServer) as info:
        sessions.check_server_version(120022, "app@db1:5432/app")
    message = str(info.value)
    assert "app@db1:5432/app is version 12.22" in message
    assert "needs 13 or later" in message
    assert "upgrade the server" in message
    assert not isinstance(info.value, CONNECTION_ERRORS)  # Kombu would retry it forever


def test_the_minimum_and_newer_versions_pass() -> None:
    for version in (sessions.MINIMUM_SERVER_VERSION, 150019, 180001, 190000):
        sessions.check_server_version(version, "app@db1:5432/app")


def next_major(db: psycopg.Connection) -> int:
    """The server_version_num of the major release after the server's."""
    return (db.info.server_version // 10000 + 1) * 10000


def test_connect_refuses_a_server_below_the_minimum(
    db_url: str, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sessions, "MINIMUM_SERVER_VERSION", next_major(db))
    name = f"pgbroker-version-{uuid.uuid4().hex[:8]}"
    url, password = with_password(db_url)
    separator = "&" if "?" in url else "?"
    with pytest.raises(UnsupportedServer) as info:
        sessions.connect(f"{url}{separator}application_name={name}")
    message = str(info.value)
    major = db.info.server_version // 10000
    assert f"is version {major}." in message
    assert f"needs {major + 1} or later" in message
    assert password not in message
    # The session is closed (its backend exits just after the client closes).
    query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
    wait_until(lambda: execute(db_url, query, (name,)) == [(0,)], 10, "the session to end")


def test_a_kombu_connection_stops_at_once(
    db_url: str, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sessions, "MINIMUM_SERVER_VERSION", next_major(db))
    with kombu.Connection(db_url) as conn, pytest.raises(UnsupportedServer):
        # Not a connection error: no retry loop, whatever max_retries says.
        conn.ensure_connection(max_retries=100, interval_start=1, interval_step=1)
