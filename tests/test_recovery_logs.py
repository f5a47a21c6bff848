"""Recovery actions log to their area's logger with structured fields
(pgbroker/logs.py): a log shipper can index ``pgbroker_action`` and
``task_id`` instead of parsing the text. The broker's records are tested
in tests/test_logging.py."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from celery import Celery

from pgbroker.durable import DurableTask
from pgbroker.durable.config import close_pools


@pytest.fixture
def app(db_url: str) -> Iterator[Celery]:
    app = Celery("recovery_logs", set_as_current=False)
    app.conf.broker_url = db_url
    yield app
    app.close()
    close_pools()


def test_a_replayed_step_and_a_retried_step_carry_their_fields(
    app: Celery, db: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    failures = [1]

    def flaky() -> str:
        if failures[0]:
            failures[0] -= 1
            raise OSError("disk busy")
        return "ok"

    @app.task(shared=False, bind=True, base=DurableTask)
    def work(self: DurableTask) -> list[Any]:
        one = self.step("one", lambda: 1)
        two = self.step("two", flaky, retries=2, backoff=0.01)
        return [one, two]

    with caplog.at_level(logging.INFO, logger="pgbroker.durable"):
        assert work.apply(task_id="logs-1", throw=True).get() == [1, "ok"]
        assert work.apply(task_id="logs-1", throw=True).get() == [1, "ok"]

    records = [r for r in caplog.records if r.name == "pgbroker.durable"]
    retried = [r for r in records if getattr(r, "pgbroker_action", None) == "step_retry"]
    assert len(retried) == 1
    # The extra= fields, as a log shipper reads them from the record.
    fields = vars(retried[0])
    assert (fields["task_id"], fields["step"], fields["count"]) == ("logs-1", "two", 1)
    assert "OSError: disk busy" in fields["reason"]
    replayed = [r for r in records if getattr(r, "pgbroker_action", None) == "replay"]
    assert [(vars(r)["task_id"], vars(r)["step"]) for r in replayed] == [
        ("logs-1", "one"),
        ("logs-1", "two"),
    ]
    assert all(r.levelno >= logging.INFO for r in replayed)
