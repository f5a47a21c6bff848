"""Publishing chains of durable links (tests/apps/chains_app.py) and
counting what became of them, for the tests that break things under a
running worker (tests/test_ha_failover.py, tests/test_pgbouncer.py).

:func:`setup` creates the tables: ``link_effect`` (a ``conn=`` step's row,
committed with its checkpoint) and ``link_publish`` (an AFTER INSERT
trigger on ``pgbroker.message`` logs each task message's (task_id,
retries): one pair twice is a message published twice, a link handed off
twice). :class:`Client` publishes chains from a thread; :func:`tally`
counts.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Set
from pathlib import Path
from typing import Any

import psycopg
from celery import chain

from tests.celery_helpers import execute, wait_until

APP = "tests.apps.chains_app"
#: Links per chain.
LENGTH = 6

SETUP = [
    "CREATE TABLE link_effect (chain int, pos int, step text, pid int, "
    "at timestamptz NOT NULL DEFAULT clock_timestamp())",
    "CREATE TABLE link_publish (id bigserial, task_id text, retries text, "
    "at timestamptz NOT NULL DEFAULT clock_timestamp())",
    """
    CREATE FUNCTION link_log_publish() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO public.link_publish (task_id, retries)
        VALUES (NEW.task_id, NEW.headers ->> 'retries');
        RETURN NULL;
    END $$
    """,
    "CREATE TRIGGER link_log_publish AFTER INSERT ON pgbroker.message "
    "FOR EACH ROW WHEN (NEW.task_id IS NOT NULL) EXECUTE FUNCTION link_log_publish()",
]

#: Task ids published and neither finished nor still queued or dead.
LOST = (
    "SELECT count(DISTINCT task_id) FROM link_publish p "
    "WHERE NOT EXISTS (SELECT 1 FROM pgbroker.task_result r "
    "WHERE r.task_id = p.task_id AND r.state IN ('SUCCESS', 'FAILURE')) "
    "AND NOT EXISTS (SELECT 1 FROM pgbroker.message m WHERE m.task_id = p.task_id) "
    "AND NOT EXISTS (SELECT 1 FROM pgbroker.dead_letter d WHERE d.task_id = p.task_id)"
)


def setup(conn: psycopg.Connection) -> None:
    """The tables, in a database that has the pgbroker schema."""
    for statement in SETUP:
        conn.execute(statement)


def count(url: str, query: str) -> int:
    return int(execute(url, query)[0][0] or 0)


def first_task_id(result: Any) -> str:
    """The task id of a chain's first link, from the AsyncResult of its last."""
    while result.parent is not None:
        result = result.parent
    return str(result.id)


class Client:
    """Publishes ``chains`` chains of LENGTH links, one every ``interval``
    seconds, from a thread; records the first task id of each chain whose
    publish returned (the client was told it was committed) and the
    AsyncResult of its last link."""

    def __init__(self, tasks: Any, chains: int, interval: float = 0.05) -> None:
        self.tasks = tasks
        self.chains = chains
        self.interval = interval
        self.published: list[str] = []
        self.results: list[Any] = []
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for c in range(self.chains):
                links = chain(self.tasks.link.si(c, pos) for pos in range(LENGTH))
                result = links.apply_async()
                self.published.append(first_task_id(result))
                self.results.append(result)
                time.sleep(self.interval)
        except BaseException as exc:
            self.errors.append(exc)

    def present_on(self, url: str) -> set[int]:
        """The chains (numbers) whose publish returned and that the database
        at ``url`` has; the others' commit was lost (a failover's)."""
        present = {task_id for (task_id,) in execute(url, "SELECT task_id FROM link_publish")}
        return {number for number, task_id in enumerate(self.published) if task_id in present}


def finished_chains(url: str) -> set[int]:
    rows = execute(
        url, f"SELECT DISTINCT chain FROM link_effect WHERE pos = {LENGTH - 1} AND step = 's1'"
    )
    return {number for (number,) in rows}


def queued_tasks(url: str) -> int:
    return count(url, "SELECT count(*) FROM pgbroker.message WHERE task_id IS NOT NULL")


@dataclasses.dataclass
class Tally:
    """What became of the chains; the first five must be zero whatever
    broke (:meth:`failures`)."""

    unfinished_chains: int
    lost_tasks: int
    duplicate_hand_offs: int
    completed_steps_run_twice: int
    failure_results: int
    steps_rerun_outside_the_database: int
    task_retries: int
    #: A chain's first link stored twice: the client's publish retried by
    #: Kombu after a lost connection whose first attempt had committed (at
    #: least once, as with Redis and RabbitMQ: docs/delivery.md); not a
    #: task's hand-off, which duplicate_hand_offs counts.
    client_publishes_stored_twice: int

    def failures(self) -> dict[str, int]:
        return {
            name: value
            for name, value in dataclasses.asdict(self).items()
            if name
            in (
                "unfinished_chains",
                "lost_tasks",
                "duplicate_hand_offs",
                "completed_steps_run_twice",
                "failure_results",
            )
            and value
        }

    def __str__(self) -> str:
        return "; ".join(
            f"{name.replace('_', ' ')} {value}" for name, value in dataclasses.asdict(self).items()
        )


def tally(url: str, chains: Set[int], step_log: Path, first_links: Set[str]) -> Tally:
    """Count, in the database at ``url``, once ``chains`` (numbers) should
    have finished and the queue is empty. ``first_links``: the task ids of
    the chains' first links, which the client publishes."""
    step_runs = Counter(step_log.read_text().splitlines()) if step_log.exists() else Counter()
    stored_twice = [
        task_id
        for (task_id,) in execute(
            url, "SELECT task_id FROM link_publish GROUP BY task_id, retries HAVING count(*) > 1"
        )
    ]
    by_client = sum(1 for task_id in stored_twice if task_id in first_links)
    return Tally(
        unfinished_chains=len(chains - finished_chains(url)),
        lost_tasks=count(url, LOST),
        duplicate_hand_offs=len(stored_twice) - by_client,
        completed_steps_run_twice=count(
            url,
            "SELECT count(*) FROM (SELECT 1 FROM link_effect GROUP BY chain, pos, step "
            "HAVING count(*) > 1) d",
        ),
        failure_results=count(
            url, "SELECT count(*) FROM pgbroker.task_result WHERE state = 'FAILURE'"
        ),
        steps_rerun_outside_the_database=sum(n - 1 for n in step_runs.values()),
        task_retries=count(url, "SELECT count(*) FROM link_publish WHERE retries <> '0'"),
        client_publishes_stored_twice=by_client,
    )


def wait_for_chains(url: str, chains: Set[int], deadline: float) -> None:
    """Until ``chains`` (numbers) finished and no task message is left
    (retries and redeliveries still queued run before counting)."""
    try:
        wait_until(
            lambda: finished_chains(url) >= chains,
            deadline,
            "every published chain to finish",
            interval=0.5,
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{diagnosis(url)}") from None
    wait_until(lambda: queued_tasks(url) == 0, 60, "the queue to drain", interval=0.5)


def duplicates_report(url: str, log: str) -> str:
    """Each message published twice: its inserts, and the worker log's
    lines that name its task."""
    out = []
    rows = execute(
        url,
        "SELECT task_id, retries, array_agg(at ORDER BY id) FROM link_publish "
        "GROUP BY task_id, retries HAVING count(*) > 1 LIMIT 3",
    )
    for task_id, retries, times in rows:
        out.append(f"--- {task_id} (retries {retries}) inserted at {times}")
        out.extend(line for line in log.splitlines() if task_id in line)
    return "\n".join(out)


def assert_clean(counts: Tally, summary: str, url: str, log: str) -> None:
    """Print ``summary`` (``pytest -s`` shows it); fail if any of the
    counts that must be zero is not, with the history of the duplicates."""
    print(summary)
    if counts.duplicate_hand_offs:
        summary += "\n" + duplicates_report(url, log)
    assert counts.failures() == {}, summary


def diagnosis(url: str) -> str:
    """Where the unfinished chains stopped, and what the queue holds."""
    queries = [
        "SELECT chain, max(pos), count(*) FROM link_effect GROUP BY chain "
        f"HAVING max(pos) < {LENGTH - 1} OR NOT bool_or(pos = {LENGTH - 1} AND step = 's1') "
        "ORDER BY chain",
        "SELECT queue, state, consumer_id, delivery_count, task_id, visible_at "
        "FROM pgbroker.message ORDER BY id LIMIT 20",
        "SELECT id, backend_pid, pid FROM pgbroker.consumer",
        "SELECT state, count(*) FROM pgbroker.task_result GROUP BY state",
        "SELECT reason, task_id FROM pgbroker.dead_letter LIMIT 5",
        "SELECT count(*) FROM link_publish",
    ]
    return "\n".join(f"{q}\n  {execute(url, q)}" for q in queries)
