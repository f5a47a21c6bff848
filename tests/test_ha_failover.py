"""Failover of the database under a running Celery deployment.

A primary and a streaming standby of our own (tests/localpg.py, the same
binaries as the test server's version); one broker URL names both hosts
with ``target_session_attrs=read-write``, as libpq's multi-host syntax
allows. A prefork worker runs chains of durable tasks
(tests/apps/failover_app.py) while the test's client keeps publishing
chains. Mid-run the primary is SIGKILLed with every process it started (a
crash of its machine, as its clients see it), and after ``DETECTION``
seconds (what Patroni or a cloud service takes to decide) the standby is
promoted. Then the test counts, on the new primary:

* unfinished chains (every chain whose ``apply_async`` returned must
  finish), lost tasks (published, then neither finished nor queued),
  duplicate hand-offs (an AFTER INSERT trigger on ``pgbroker.message`` logs
  each task message's (task_id, retries): one pair twice is a link handed
  off twice), completed steps run twice (a ``conn=`` step commits its row
  with its checkpoint: two rows for one step);
* steps re-run outside the database (a file line written before the
  step's commit: a step whose commit was lost with the primary runs again,
  at least once by design) and task retries;
* seconds from the primary's death to the first task completed on the new
  primary.

With synchronous replication (``synchronous_standby_names``) a commit
returns only once the standby has flushed it: every count must be zero.
With asynchronous replication the commits that the standby had not yet
received when the primary died are lost. The test makes that window
``LAG`` seconds wide (the standby's WAL receiver is stopped before the
kill and killed after it, losing what was in flight to it; on one machine
it would otherwise be caught up): the client's
publishes in it are lost (their chains never run; ``publishes lost`` must
be above zero), and so is the workers' progress, which is redone from the
last state the standby had: the database stays consistent, so its counts
stay zero, while steps' work outside the database is done again. Both
runs print one summary line (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import chain

from pgbroker.database import schema
from pgbroker.database.sessions import connect
from tests import localpg
from tests.celery_helpers import celery_env, client_app, execute, start_worker, wait_until

pytestmark = pytest.mark.slow

APP = "tests.apps.failover_app"
#: Chains published in all, the kill coming after KILL_AFTER of them.
CHAINS = 40
KILL_AFTER = 20
LENGTH = 6
#: Seconds between the primary's death and the standby's promotion.
DETECTION = 1.0
#: Asynchronous replication: seconds of commits the standby misses (its WAL
#: receiver stopped before the primary dies).
LAG = 0.5
DEADLINE = 180

SETUP = [
    "CREATE TABLE ha_effect (chain int, pos int, step text, pid int, "
    "at timestamptz NOT NULL DEFAULT clock_timestamp())",
    "CREATE TABLE ha_publish (id bigserial, task_id text, retries text, "
    "at timestamptz NOT NULL DEFAULT clock_timestamp())",
    """
    CREATE FUNCTION ha_log_publish() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO public.ha_publish (task_id, retries)
        VALUES (NEW.task_id, NEW.headers ->> 'retries');
        RETURN NULL;
    END $$
    """,
    "CREATE TRIGGER ha_log_publish AFTER INSERT ON pgbroker.message "
    "FOR EACH ROW WHEN (NEW.task_id IS NOT NULL) EXECUTE FUNCTION ha_log_publish()",
]

#: Task ids published and neither finished nor still queued or dead.
LOST = (
    "SELECT count(DISTINCT task_id) FROM ha_publish p "
    "WHERE NOT EXISTS (SELECT 1 FROM pgbroker.task_result r "
    "WHERE r.task_id = p.task_id AND r.state IN ('SUCCESS', 'FAILURE')) "
    "AND NOT EXISTS (SELECT 1 FROM pgbroker.message m WHERE m.task_id = p.task_id) "
    "AND NOT EXISTS (SELECT 1 FROM pgbroker.dead_letter d WHERE d.task_id = p.task_id)"
)


def binaries(pg_admin_url: str) -> Path:
    """The installation of the test server's major version, else the newest."""
    found = localpg.installations()
    if not found:
        pytest.skip("no PostgreSQL binaries to start a primary and a standby with")
    with psycopg.connect(pg_admin_url) as conn:
        major = conn.info.server_version // 10000
    return found.get(major, found[max(found)])


@contextlib.contextmanager
def primary_and_standby(bindir: Path, synchronous: bool) -> Any:
    with localpg.folder("pgbroker-ha-") as base:
        primary = localpg.Server(bindir, base / "primary")
        primary.initdb(
            synchronous_standby_names="standby1" if synchronous else "",
            wal_keep_size="256MB",
        )
        primary.start()
        standby: localpg.Server | None = None
        try:
            standby = primary.standby(base / "standby", "standby1", synchronous_standby_names="")
            standby.start()
            yield primary, standby
        finally:
            for server in (standby, primary):
                if server is not None:
                    server.stop("immediate")


def replication_state(primary: localpg.Server) -> str | None:
    rows = execute(primary.url(), "SELECT sync_state FROM pg_stat_replication")
    return rows[0][0] if rows else None


def count(url: str, query: str) -> int:
    return int(execute(url, query)[0][0] or 0)


def first_task_id(result: Any) -> str:
    """The task id of a chain's first link, from the AsyncResult of its last."""
    while result.parent is not None:
        result = result.parent
    return str(result.id)


class Client:
    """Publishes CHAINS chains, one every 50 ms, from a thread; records the
    first task id of each chain whose publish returned (the client was told
    it was committed)."""

    def __init__(self, tasks: Any) -> None:
        self.tasks = tasks
        self.published: list[str] = []
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            for c in range(CHAINS):
                result = chain(self.tasks.link.si(c, pos) for pos in range(LENGTH)).apply_async()
                self.published.append(first_task_id(result))
                time.sleep(0.05)
        except BaseException as exc:
            self.errors.append(exc)


def duplicates_report(url: str, log: str) -> str:
    """Each message published twice: its inserts, and the worker's log
    lines that name its task or its parent."""
    out = []
    rows = execute(
        url,
        "SELECT task_id, retries, array_agg(at ORDER BY id) FROM ha_publish "
        "GROUP BY task_id, retries HAVING count(*) > 1 LIMIT 3",
    )
    for task_id, retries, times in rows:
        out.append(f"--- {task_id} (retries {retries}) inserted at {times}")
        out.extend(line for line in log.splitlines() if task_id in line)
    return "\n".join(out)


def finished_chains(url: str) -> int:
    return count(
        url,
        f"SELECT count(DISTINCT chain) FROM ha_effect WHERE pos = {LENGTH - 1} AND step = 's1'",
    )


def queued_tasks(url: str) -> int:
    return count(url, "SELECT count(*) FROM pgbroker.message WHERE task_id IS NOT NULL")


@pytest.mark.timeout(DEADLINE + 120)
@pytest.mark.parametrize("replication", ["synchronous", "asynchronous"])
def test_chains_survive_a_failover(pg_admin_url: str, tmp_path: Path, replication: str) -> None:
    synchronous = replication == "synchronous"
    with primary_and_standby(binaries(pg_admin_url), synchronous) as (primary, standby):
        expected = "sync" if synchronous else "async"
        wait_until(lambda: replication_state(primary) == expected, 30, "the standby to stream")
        url = (
            f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}"
            "/postgres?target_session_attrs=read-write"
        )
        with connect(url) as conn:
            schema.migrate(conn, "pgbroker")
            for statement in SETUP:
                conn.execute(statement)
        step_log = tmp_path / "steps.log"
        env = celery_env(url, HA_STEP_LOG=str(step_log))
        new_primary = standby.url()
        with start_worker(APP, env, tmp_path) as worker, client_app(APP, url) as tasks:
            worker.wait_for_log("ready.", timeout=60)
            client = Client(tasks)
            client.thread.start()
            wait_until(lambda: len(client.published) >= KILL_AFTER, 60, "the first chains")
            receiver = None
            if not synchronous:
                # The standby falls LAG seconds behind: its WAL receiver stops.
                (receiver,) = execute(new_primary, "SELECT pid FROM pg_stat_wal_receiver")[0]
                os.kill(receiver, signal.SIGSTOP)
                time.sleep(LAG)
            primary.kill()
            killed_at = time.time()
            if receiver is not None:
                # What it had not read yet goes with it, as with a network cut
                # (its socket's buffers would still hold it all after a SIGCONT).
                # The standby restarts its processes and replays what is on its disk.
                os.kill(receiver, signal.SIGKILL)
            time.sleep(DETECTION)
            promoting_at = time.time()
            standby.promote()
            promoted_at = time.time()
            client.thread.join(DEADLINE)
            assert not client.errors, client.errors
            # Publishes the client was told were committed, absent on the new
            # primary: their commit never reached the standby.
            present = {
                task_id for (task_id,) in execute(new_primary, "SELECT task_id FROM ha_publish")
            }
            publishes_lost = len(set(client.published) - present)
            wait_until(
                lambda: finished_chains(new_primary) >= len(client.published) - publishes_lost,
                DEADLINE,
                "every published chain to finish",
                interval=0.5,
            )
            # Retries and redeliveries still queued run before counting.
            wait_until(lambda: queued_tasks(new_primary) == 0, 60, "the queue to drain")
            assert worker.proc.poll() is None, "the worker exited"
        # The first link's last step committed on the new primary: after the
        # promotion began (the clock is the server's, at the insert; a link's
        # date_done is the worker's, at the end of the body, before the commit).
        first_done = execute(
            new_primary,
            "SELECT extract(epoch FROM min(at)) FROM ha_effect "
            "WHERE step = 's1' AND at > to_timestamp(%s)",
            (promoting_at,),
        )[0][0]
        unfinished = len(client.published) - publishes_lost - finished_chains(new_primary)
        lost = count(new_primary, LOST)
        duplicate_handoffs = count(
            new_primary,
            "SELECT count(*) FROM (SELECT 1 FROM ha_publish GROUP BY task_id, retries "
            "HAVING count(*) > 1) d",
        )
        steps_twice = count(
            new_primary,
            "SELECT count(*) FROM (SELECT 1 FROM ha_effect GROUP BY chain, pos, step "
            "HAVING count(*) > 1) d",
        )
        step_runs = Counter(step_log.read_text().splitlines())
        reruns_outside = sum(n - 1 for n in step_runs.values())
        retried = count(new_primary, "SELECT count(*) FROM ha_publish WHERE retries <> '0'")
        failed = count(
            new_primary, "SELECT count(*) FROM pgbroker.task_result WHERE state = 'FAILURE'"
        )
        summary = (
            f"failover ({replication} replication): {len(client.published)} chains x {LENGTH} "
            f"links published; publishes lost {publishes_lost}; unfinished chains {unfinished}; "
            f"lost tasks {lost}; duplicate hand-offs {duplicate_handoffs}; completed steps run "
            f"twice {steps_twice}; steps re-run outside the database {reruns_outside}; task "
            f"retries {retried}; FAILURE results {failed}; primary killed -> first task "
            f"completed on the new primary {float(first_done) - killed_at:.2f} s "
            f"(promoted {promoting_at - killed_at:.2f} s to {promoted_at - killed_at:.2f} s after)"
        )
        print(summary)
        if duplicate_handoffs:
            summary += "\n" + duplicates_report(new_primary, worker.log())
        counts = {
            "unfinished chains": unfinished,
            "lost tasks": lost,
            "duplicate hand-offs": duplicate_handoffs,
            "completed steps run twice": steps_twice,
            "FAILURE results": failed,
        }
        if synchronous:
            counts["publishes lost"] = publishes_lost
        assert counts == dict.fromkeys(counts, 0), summary
        if not synchronous:
            # The lag lost the client's last publishes: the run measured it.
            assert publishes_lost > 0, summary
