"""Failover of the database under a running Celery deployment.

A primary and a streaming standby of our own (tests/localpg.py, the same
binaries as the test server's version); one broker URL names both hosts
with ``target_session_attrs=read-write``, as libpq's multi-host syntax
allows. A prefork worker runs chains of durable tasks
(tests/apps/chains_app.py) while the test's client keeps publishing
chains. Mid-run the primary is SIGKILLed with every process it started (a
crash of its machine, as its clients see it), and after ``DETECTION``
seconds (what Patroni or a cloud service takes to decide) the standby is
promoted. Then the test counts, on the new primary:

* unfinished chains (every chain whose ``apply_async`` returned and whose
  publish the new primary has must finish), lost tasks (published, then
  neither finished nor queued),
  duplicate hand-offs (an AFTER INSERT trigger on ``pgbroker.message`` logs
  each task message's (task_id, retries): one pair twice is a link handed
  off twice; a chain's first link stored twice is the client's publish,
  retried by Kombu after the kill took its commit's reply, counted apart:
  at least once, docs/delivery.md), completed steps run twice (a ``conn=`` step commits its row
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
it would otherwise be caught up): the client's publishes in it are lost
(their chains never run; ``publishes lost`` must be above zero), and so is
the workers' progress, which is redone from the last state the standby
had: the counts must stay zero, while steps' work outside the database is
done again. (This case found that the new primary hands the lost window's
message ids out again: tests/test_reused_ids.py.) Both runs print one
summary line (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgbroker.database import schema
from pgbroker.database.sessions import connect
from tests import chain_ledger, localpg
from tests.celery_helpers import celery_env, client_app, execute, start_worker, wait_until

pytestmark = pytest.mark.slow

#: Chains published in all, the kill coming after KILL_AFTER of them.
CHAINS = 40
KILL_AFTER = 20
#: Seconds between the primary's death and the standby's promotion.
DETECTION = 1.0
#: Asynchronous replication: seconds of commits the standby misses (its WAL
#: receiver stopped before the primary dies).
LAG = 0.5
DEADLINE = 90


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
            chain_ledger.setup(conn)
        step_log = tmp_path / "steps.log"
        env = celery_env(url, LINK_STEP_LOG=str(step_log))
        new_primary = standby.url()
        with (
            start_worker(chain_ledger.APP, env, tmp_path) as worker,
            client_app(chain_ledger.APP, url) as tasks,
        ):
            worker.wait_for_log("ready.", timeout=60)
            client = chain_ledger.Client(tasks, CHAINS)
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
            present = client.present_on(new_primary)
            publishes_lost = len(client.published) - len(present)
            chain_ledger.wait_for_chains(new_primary, present, DEADLINE)
            assert worker.proc.poll() is None, "the worker exited"
        # The first link's last step committed on the new primary: after the
        # promotion began (the clock is the server's, at the insert; a link's
        # date_done is the worker's, at the end of the body, before the commit).
        first_done = execute(
            new_primary,
            "SELECT extract(epoch FROM min(at)) FROM link_effect "
            "WHERE step = 's1' AND at > to_timestamp(%s)",
            (promoting_at,),
        )[0][0]
        counts = chain_ledger.tally(new_primary, present, step_log, set(client.published))
        # A lost publish whose first link a worker had claimed from the old
        # primary may run all the same: that run's own retry, published to
        # the new primary, carries the chain on.
        ran_anyway = len(chain_ledger.finished_chains(new_primary) - present)
        summary = (
            f"failover ({replication} replication): {len(client.published)} chains x "
            f"{chain_ledger.LENGTH} links published; publishes lost {publishes_lost} "
            f"({ran_anyway} of them ran all the same); {counts}; "
            f"primary killed -> first task completed on the new primary "
            f"{float(first_done) - killed_at:.2f} s (promoted {promoting_at - killed_at:.2f} s "
            f"to {promoted_at - killed_at:.2f} s after)"
        )
        chain_ledger.assert_clean(counts, summary, new_primary, worker.log())
        if synchronous:
            assert publishes_lost == 0, summary
        else:
            # The lag lost the client's last publishes: the run measured it.
            assert publishes_lost > 0, summary
