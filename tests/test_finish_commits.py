"""What a chain link costs in durable commits.

A commit is durable when it waits for the WAL flush (synchronous_commit not
off) and its transaction changed a row. A trigger on every pgbroker table
records each transaction that changes a row, with the synchronous_commit
in force at its first change (tests/test_claim_durability.py checks that a
claim's own setting is in force by then). With the result backend in the
broker's schema a task's result, the next link of its chain and its ack
commit together (pgbroker/broker/finish.py), and a claim whose riding acks
removed nothing commits without waiting for the flush:

* acks_late: one durable commit per link (its finish);
* acks as delivered (Celery's default): two (the ack, then the finish).

These tests fail if a link costs more, for example if the hand-off, the
result or the ack commit on their own again.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from celery import chain

from tests.celery_helpers import celery_env, client_app, start_worker
from tests.commit_log import durable_commits, record_durable_commits

APP = "tests.apps.delivery_app"
LINKS = 10


@pytest.mark.parametrize(("task", "per_link"), [("link_late", 1), ("link", 2)])
def test_a_chain_link_costs_at_most_its_durable_commits(
    db_url: str, db: psycopg.Connection, tmp_path: Path, task: str, per_link: int
) -> None:
    """The cost of a link: the durable commits of a chain of 2 * LINKS, at
    most ``per_link`` each, plus what a chain costs once (the client's
    publish, the last link's result) and one write of the periodic sweep
    that may fall in the run. (The difference with a chain of LINKS was
    measured before: an early ack taken by the finish or written on its
    own comes by timing, in any number of links of either run, and CI saw
    the shorter chain cheaper by four.) A chain of LINKS is run and printed
    beside it."""
    record_durable_commits(db)
    env = celery_env(db_url)
    counts = []
    with (
        client_app(APP, db_url) as tasks,
        start_worker(APP, env, tmp_path, extra=("-Q", "celery")) as worker,
    ):
        worker.wait_for_log("ready.")
        # A first chain warms the worker up (declarations, consumers).
        signature = getattr(tasks, task)
        assert chain(signature.s(0), signature.s()).apply_async().get(timeout=60) == 2
        for links in (LINKS, 2 * LINKS):
            db.execute("TRUNCATE public.commit_log")
            result = chain(signature.s(0), *[signature.s()] * (links - 1)).apply_async()
            assert result.get(timeout=60) == links
            counts.append(durable_commits(db_url))
    short, long = counts
    print(f"{task}: {len(short)} durable commits for {LINKS} links, {len(long)} for {2 * LINKS}")
    assert len(long) <= per_link * 2 * LINKS + 3, f"{LINKS} links: {short}, {2 * LINKS}: {long}"
