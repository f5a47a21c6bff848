"""The beat scheduler (pgbroker/operations/beat.py) in real processes: two ``celery
beat`` processes, a worker, SIGKILL of the leader, runtime changes."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
from celery.schedules import crontab

from pgbroker.operations import beat
from tests.celery_helpers import celery_env, start_worker, started, wait_until
from tests.kombu_helpers import scalar

APP = "tests.apps.beat_app"
TASK = "tests.apps.beat_app.record"
BEAT = ["beat", "-l", "info", "-S", "pgbroker"]  # the entry-point alias
LEADER = "beat: this process is now the leader"
SECOND = timedelta(seconds=1)


def _create_run_table(db: psycopg.Connection) -> None:
    db.execute(
        "CREATE TABLE beat_run (id bigserial PRIMARY KEY, entry text NOT NULL, slot timestamptz, "
        "task_id text NOT NULL, ran_at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )


def _runs(db: psycopg.Connection, *entries: str) -> list[tuple]:
    return db.execute(
        "SELECT slot, ran_at FROM beat_run WHERE entry = ANY(%s) ORDER BY slot, id",
        [list(entries)],
    ).fetchall()


def _latest_slot(db: psycopg.Connection, entry: str) -> datetime:
    """The latest slot of ``entry`` the worker has run (the epoch if none)."""
    row = db.execute("SELECT max(slot) FROM beat_run WHERE entry = %s", [entry]).fetchone()
    return row[0] if row and row[0] else datetime.fromtimestamp(0, timezone.utc)


def _claimed(db: psycopg.Connection, name: str) -> int:
    row = db.execute(
        "SELECT total_run_count FROM pgbroker.beat_entry WHERE name = %s", [name]
    ).fetchone()
    return int(row[0]) if row else 0


def _wait_all_run(db: psycopg.Connection, name: str, *entries: str) -> int:
    """Wait until the worker has run every claimed slot of ``name``."""
    claimed = _claimed(db, name)
    wait_until(
        lambda: len(_runs(db, *entries)) >= claimed,
        20,
        f"the worker to run the {claimed} claimed runs of {name}",
    )
    return claimed


def _standby_tries(db: psycopg.Connection, seen: set[tuple[Any, ...]]) -> int:
    """Adds to ``seen`` the tries to take the beat lock that the sessions whose
    last statement it was are idle after (a leader's next statements differ);
    returns the most tries seen from one session."""
    seen.update(
        db.execute(
            "SELECT pid, query_start FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
            " AND state = 'idle' AND query LIKE %s",
            ["%pg_try_advisory_lock(hashtext('pgbroker.operations.beat')%"],
        ).fetchall()
    )
    return max(Counter(pid for pid, _ in seen).values(), default=0)


def test_standby_takes_over_after_sigkill_without_duplicate_or_gap(
    db_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    _create_run_table(db)
    env = celery_env(db_url)
    tries: set[tuple[Any, ...]] = set()
    with start_worker(APP, env, tmp_path) as worker:
        worker.wait_for_log("ready.")
        with started("beat-a", APP, BEAT, env, tmp_path) as a:
            a.wait_for_log(LEADER)
            with started("beat-b", APP, BEAT, env, tmp_path) as b:
                b.wait_for_log("beat: Starting...")
                wait_until(lambda: len(_runs(db, "every-second")) >= 4, 20, "4 runs from beat-a")
                # b has tried (and failed) to take the lock: a standby tries
                # again, a leader never does.
                wait_until(lambda: _standby_tries(db, tries) >= 2, 15, "beat-b to try twice")
                assert LEADER not in b.log()

                a.kill_group()  # SIGKILL: no goodbye, Postgres drops the session
                killed = time.monotonic()
                killed_at = scalar(db, "SELECT clock_timestamp()")
                a.wait_exit(10)
                b.wait_for_log(LEADER, timeout=20)
                takeover = time.monotonic() - killed
                took_over_at = scalar(db, "SELECT clock_timestamp()")
                print(f"standby became the leader {takeover:.2f} s after the SIGKILL")
                # Runs of slots beat-b sent after it took over (under load the
                # worker may still be running slots beat-a sent before).
                wait_until(
                    lambda: _latest_slot(db, "every-second") > took_over_at + 3 * SECOND,
                    20,
                    "beat-b's runs",
                )
            assert takeover < 6, f"takeover took {takeover:.1f} s"
            assert "Sending due task every-second" in b.log()
        claimed = _wait_all_run(db, "every-second", "every-second")

    runs = _runs(db, "every-second")
    slots = [slot for slot, _ in runs]
    assert None not in slots, "the slot header did not reach the task"
    # Every claimed slot ran exactly once: no duplicate...
    assert len(slots) == len(set(slots)) == claimed
    # ...and no gap: one slot per second, from the first to the last.
    gaps = [later - earlier for earlier, later in itertools.pairwise(slots)]
    assert set(gaps) == {SECOND}, gaps
    assert len(slots) >= 8
    row = db.execute(
        "SELECT last_run_at FROM pgbroker.beat_entry WHERE name = 'every-second'"
    ).fetchone()
    assert row is not None and row[0] == slots[-1]
    # The unbroken chain spans the failover: beat-a sent the first slots,
    # beat-b the last ones, and the slots due in between were sent too.
    assert slots[0] < killed_at - 2 * SECOND
    assert slots[-1] > took_over_at + 2 * SECOND
    lateness = max((ran_at - slot).total_seconds() for slot, ran_at in runs)
    print(f"largest delay from a slot to its run: {lateness:.2f} s")
    assert lateness < 10


def test_entries_added_changed_and_disabled_at_runtime(
    db_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    _create_run_table(db)
    env = celery_env(db_url)
    with start_worker(APP, env, tmp_path) as worker, started("beat", APP, BEAT, env, tmp_path) as b:
        worker.wait_for_log("ready.")
        b.wait_for_log(LEADER)
        beat.add_entry(db_url, "added", TASK, 0.5, args=["added"])
        wait_until(lambda: len(_runs(db, "added")) >= 2, 15, "runs of the added entry")

        entry = beat.update_entry(db_url, "added", args=["changed"])
        assert entry.args == ["changed"]
        wait_until(lambda: len(_runs(db, "changed")) >= 2, 15, "runs with the changed args")

        entry = beat.disable_entry(db_url, "added")
        assert not entry.enabled
        claimed = _wait_all_run(db, "added", "added", "changed")
        # The scheduler is alive and the other entry still runs: three more
        # runs of it, so at least four slots of "added" pass meanwhile.
        before = len(_runs(db, "every-second"))
        wait_until(lambda: len(_runs(db, "every-second")) >= before + 3, 15, "every-second runs")
        assert _claimed(db, "added") == claimed
        assert len(_runs(db, "added", "changed")) == claimed

        slots = [slot for slot, _ in _runs(db, "added", "changed")]
        assert len(slots) == len(set(slots))
        assert {b - a for a, b in itertools.pairwise(slots)} == {timedelta(seconds=0.5)}
        names = {e.name: e for e in beat.list_entries(db_url)}
        # celery.backend_cleanup: installed by Celery (no result backend
        # expires results here), a crontab.
        assert set(names) == {"every-second", "added", "celery.backend_cleanup"}
        assert names["celery.backend_cleanup"].schedule == crontab("0", "4", "*")
        assert names["added"].from_config is False and names["every-second"].from_config
