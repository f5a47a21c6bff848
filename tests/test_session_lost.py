"""Pooled sessions that the server ends while idle (pg_terminate_backend, a
restart) are replaced on next use, not turned into task failures.

Found by the chaos test: a result store after a chain's hand-off failed
with AdminShutdown (SQLSTATE 57P01) because only errors without a SQLSTATE
were retried.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from celery import Celery

from pgbroker.database import pools
from pgbroker.durable import DurableTask
from pgbroker.durable.config import close_pools
from pgbroker.errors import session_lost


@pytest.fixture
def app(db_url: str) -> Iterator[Celery]:
    app = Celery("session_lost", set_as_current=False)
    app.conf.update(broker_url=db_url, result_backend=db_url)
    yield app
    app.close()
    pools.close_pools()


def terminate_other_sessions(db: psycopg.Connection) -> int:
    """End every other session on this database; return how many."""
    row = db.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_result_backend_replaces_a_terminated_pooled_session(
    app: Celery, db: psycopg.Connection
) -> None:
    backend = app.backend
    backend.store_result("t-1", 1, "SUCCESS")
    assert terminate_other_sessions(db) >= 1
    backend.store_result("t-2", 2, "SUCCESS")  # a write on a dead session
    assert terminate_other_sessions(db) >= 1
    assert backend.get_task_meta("t-1")["result"] == 1  # a read on a dead session
    assert backend.get_task_meta("t-2")["status"] == "SUCCESS"


def test_durable_task_replaces_a_terminated_pooled_session(
    app: Celery, db: psycopg.Connection
) -> None:
    ran: list[str] = []

    @app.task(bind=True, base=DurableTask, shared=False)
    def two_steps(self: DurableTask) -> str:
        self.step("one", ran.append, "one")
        return "done"

    assert two_steps.apply(task_id=str(uuid.uuid4()), throw=True).get() == "done"
    assert terminate_other_sessions(db) >= 1
    assert two_steps.apply(task_id=str(uuid.uuid4()), throw=True).get() == "done"
    assert ran == ["one", "one"]
    close_pools()


def test_only_a_lost_session_is_retried() -> None:
    assert session_lost(psycopg.OperationalError("server closed the connection"))
    assert not session_lost(ValueError("not a database error"))
    canceled = psycopg.errors.QueryCanceled("canceling statement due to statement timeout")
    assert not session_lost(canceled)  # 57014: the statement's own fault
    assert session_lost(psycopg.errors.AdminShutdown("terminating connection"))
