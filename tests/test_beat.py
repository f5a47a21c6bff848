"""The beat scheduler (pgbroker/operations/beat.py) in this process: slots, the
schedule table, leadership and claims, against a real database."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from celery import Celery
from celery.beat import BeatLazyFunc
from celery.schedules import crontab, schedule

from pgbroker.errors import ConfigurationError, EntryExists, EntryNotFound
from pgbroker.operations import beat
from pgbroker.operations.beat import PgScheduler

UTC = timezone.utc
T0 = datetime(2030, 1, 7, 12, 0, 0, tzinfo=UTC)  # a Monday
TASK = "tests.beat.noop"


# --- slots ----------------------------------------------------------------------------


def test_schedule_columns() -> None:
    assert beat.schedule_columns(2)["interval_seconds"] == 2.0
    assert beat.schedule_columns(timedelta(minutes=1))["interval_seconds"] == 60.0
    assert beat.schedule_columns(schedule(timedelta(seconds=90)))["interval_seconds"] == 90.0
    cols = beat.schedule_columns(crontab(minute="*/15", hour=[1, 3], day_of_week="mon-fri"))
    assert cols["interval_seconds"] is None
    assert (cols["cron_minute"], cols["cron_hour"], cols["cron_day_of_week"]) == (
        "*/15",
        "1,3",
        "mon-fri",
    )
    for bad in (0, -1, "5", True, schedule(5, relative=True)):
        with pytest.raises(ConfigurationError):
            beat.schedule_columns(bad)


def test_interval_slots_and_catchup_keep_their_phase() -> None:
    every = schedule(timedelta(seconds=10))
    assert beat.next_slot(every, T0) == T0 + timedelta(seconds=10)
    now = T0 + timedelta(seconds=35)
    assert beat.first_slot(every, T0, now, catchup=300) == (T0 + timedelta(seconds=10), None)
    # Slots more than 12 s old are skipped; the first one kept is T0 + 30 s.
    assert beat.first_slot(every, T0, now, catchup=12) == (
        T0 + timedelta(seconds=30),
        T0 + timedelta(seconds=20),
    )
    assert beat.first_slot(every, T0, now, catchup=0)[0] == T0 + timedelta(seconds=40)


def test_crontab_slots_are_strictly_after_the_last_one() -> None:
    app = Celery("slots", set_as_current=False)
    app.conf.timezone = "UTC"
    quarter = crontab(minute="*/15", app=app)
    assert beat.next_slot(quarter, T0) == T0 + timedelta(minutes=15)
    assert beat.next_slot(quarter, T0 + timedelta(minutes=1)) == T0 + timedelta(minutes=15)
    nightly = crontab(minute=0, hour=4, app=app)
    assert beat.next_slot(nightly, T0) == T0 + timedelta(hours=16)
    now = T0 + timedelta(minutes=50)
    assert beat.first_slot(quarter, T0, now, catchup=3600) == (T0 + timedelta(minutes=15), None)
    slot, skip_to = beat.first_slot(quarter, T0, now, catchup=20 * 60)
    assert slot == T0 + timedelta(minutes=30)
    assert skip_to is not None and beat.next_slot(quarter, skip_to) == slot
    # In the app's timezone: 04:00 in Paris is 03:00 UTC in January.
    paris = Celery("paris", set_as_current=False)
    paris.conf.timezone = "Europe/Paris"
    assert beat.next_slot(crontab(minute=0, hour=4, app=paris), T0) == datetime(
        2030, 1, 8, 3, 0, tzinfo=UTC
    )


# --- the scheduler against a database -------------------------------------------------


def _app(broker: str, schedule_: dict[str, Any] | None = None, **conf: Any) -> Celery:
    app = Celery("beat_test", set_as_current=False)
    app.conf.broker_url = broker
    app.conf.broker_transport_options = {"sweep_interval": 0.5}
    app.conf.result_expires = None  # no celery.backend_cleanup entry
    app.conf.beat_schedule = (
        {"tick": {"task": TASK, "schedule": 1.0, "args": [1]}} if schedule_ is None else schedule_
    )
    app.conf.update(conf)
    return app


@pytest.fixture
def schedulers() -> Iterator[Callable[[Celery], PgScheduler]]:
    made: list[tuple[PgScheduler, Celery]] = []

    def make(app: Celery) -> PgScheduler:
        s = PgScheduler(app=app)
        made.append((s, app))
        return s

    yield make
    for s, app in made:
        s.close()
        app.close()


def _entry(db: psycopg.Connection, name: str) -> tuple[Any, ...]:
    row = db.execute(
        "SELECT last_run_at, total_run_count, enabled, args::text FROM pgbroker.beat_entry "
        "WHERE name = %s",
        [name],
    ).fetchone()
    assert row is not None
    return tuple(row)


def _rewind(db: psycopg.Connection, name: str, seconds: float) -> datetime:
    """Move an entry's last run back; return the new value."""
    row = db.execute(
        "UPDATE pgbroker.beat_entry SET last_run_at = now() - "
        "make_interval(secs => %s) WHERE name = %s RETURNING last_run_at",
        [seconds, name],
    ).fetchone()
    assert row is not None
    return row[0]


def _messages(db: psycopg.Connection) -> list[str]:
    rows = db.execute(
        "SELECT headers->>'pgbroker_beat_slot' FROM pgbroker.message "
        "WHERE task_name = %s ORDER BY id",
        [TASK],
    ).fetchall()
    return [r[0] for r in rows]


def test_one_leader_and_takeover_when_it_closes(
    db_url: str, db: psycopg.Connection, schedulers: Callable[[Celery], PgScheduler]
) -> None:
    a = schedulers(_app(db_url))
    b = schedulers(_app(db_url))
    a.tick()
    assert a.is_leader
    assert b.tick() == b.standby_interval
    assert not b.is_leader
    assert [e.name for e in beat.list_entries(db_url)] == ["tick"]
    a.close()  # its session ends: the lock is free
    b.tick()
    assert b.is_leader


def test_claim_and_message_commit_together_with_a_pgbroker_broker(
    db_url: str,
    db: psycopg.Connection,
    schedulers: Callable[[Celery], PgScheduler],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = schedulers(_app(db_url))
    s.tick()
    last = _rewind(db, "tick", 3.5)
    _, count, *_ = _entry(db, "tick")
    s.tick()
    # The three slots due (four on a slow machine), each once, in order,
    # with its slot in a header.
    sent = _messages(db)
    assert len(sent) in (3, 4)
    slots = [last + timedelta(seconds=n) for n in range(1, len(sent) + 1)]
    assert sent == [t.isoformat() for t in slots]
    assert _entry(db, "tick")[:2] == (slots[-1], count + len(sent))
    assert s._shared is True

    # A publish that fails rolls its claim back: the slot stays due.
    def fail(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("broker gone")

    _rewind(db, "tick", 1.5)
    before = _entry(db, "tick")
    monkeypatch.setattr(s, "_publish", fail)
    assert s.tick() == s.retry_interval
    assert _entry(db, "tick") == before
    assert _messages(db) == sent
    assert s.is_leader
    monkeypatch.undo()
    s.tick()
    assert len(_messages(db)) > len(sent)


def test_claim_commits_first_with_another_broker(
    db_url: str,
    db: psycopg.Connection,
    schedulers: Callable[[Celery], PgScheduler],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = schedulers(_app("memory://", pgbroker_beat_url=db_url))
    s.tick()
    sent: list[str] = []
    real = s._publish

    def spy(entry: Any, claimed: Any, slot: datetime, retry: bool) -> None:
        # The claim is committed (visible to another session) before publishing.
        assert _entry(db, "tick")[0] == slot
        real(entry, claimed, slot, retry)
        sent.append(slot.isoformat())

    monkeypatch.setattr(s, "_publish", spy)
    last = _rewind(db, "tick", 2.5)
    s.tick()
    assert s._shared is False
    assert len(sent) in (2, 3)  # 3 on a slow machine
    assert sent == [(last + timedelta(seconds=n)).isoformat() for n in range(1, len(sent) + 1)]

    # A failed publish gives the claim back.
    def fail(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("broker gone")

    monkeypatch.setattr(s, "_publish", fail)
    _rewind(db, "tick", 1.5)
    before = _entry(db, "tick")
    assert s.tick() == s.retry_interval
    assert _entry(db, "tick") == before


def test_old_missed_runs_are_skipped(
    db_url: str,
    db: psycopg.Connection,
    schedulers: Callable[[Celery], PgScheduler],
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = schedulers(_app(db_url, pgbroker_beat_catchup=2))
    s.tick()
    _rewind(db, "tick", 100)
    with caplog.at_level(logging.WARNING, "pgbroker.operations"):
        s.tick()
    assert 2 <= len(_messages(db)) <= 3  # the slots of the last 2 s only
    assert "skipped the runs" in caplog.text
    # Skipped once: the next ticks neither send them nor warn again.
    caplog.clear()
    sent = len(_messages(db))
    with caplog.at_level(logging.WARNING, "pgbroker.operations"):
        s.tick()
    assert "skipped" not in caplog.text
    assert len(_messages(db)) <= sent + 1

    # A slot skipped while the next one is still ahead is skipped once too.
    beat.update_entry(db_url, "tick", schedule=3600)
    _rewind(db, "tick", 3 * 3600 + 1800)  # due 30 min ago: older than 2 s
    with caplog.at_level(logging.WARNING, "pgbroker.operations"):
        s.tick()
        s.tick()
    assert caplog.text.count("skipped the runs") == 1
    assert len(_messages(db)) <= sent + 1


def test_beat_schedule_sync_keeps_runtime_changes_until_the_code_changes(
    db_url: str, db: psycopg.Connection, schedulers: Callable[[Celery], PgScheduler]
) -> None:
    config = {
        "tick": {"task": TASK, "schedule": 1.0, "args": [1]},
        "gone": {"task": TASK, "schedule": crontab(minute="*/5"), "kwargs": {"x": 1}},
    }
    first = schedulers(_app(db_url, config))
    first.tick()
    beat.add_entry(db_url, "runtime", TASK, 60, args=["r"])
    with pytest.raises(EntryExists):
        beat.add_entry(db_url, "runtime", TASK, 60)
    beat.update_entry(db_url, "tick", args=[2])
    beat.disable_entry(db_url, "gone")
    first.close()

    # Same beat_schedule: the runtime changes stay.
    second = schedulers(_app(db_url, config))
    second.tick()
    entries = {e.name: e for e in beat.list_entries(db_url)}
    assert set(entries) == {"tick", "gone", "runtime"}
    assert entries["tick"].args == [2]
    assert not entries["gone"].enabled
    assert entries["gone"].schedule == crontab(minute="*/5")
    second.close()

    # beat_schedule changed: its new definition wins, a removed entry goes,
    # the runtime entry stays.
    third = schedulers(_app(db_url, {"tick": {"task": TASK, "schedule": 2.0, "args": [3]}}))
    third.tick()
    entries = {e.name: e for e in beat.list_entries(db_url)}
    assert set(entries) == {"tick", "runtime"}
    assert entries["tick"].args == [3]
    assert entries["tick"].schedule == schedule(timedelta(seconds=2))
    assert entries["runtime"].args == ["r"] and not entries["runtime"].from_config


def test_enabling_restarts_from_now_and_disabled_entries_are_not_sent(
    db_url: str, db: psycopg.Connection, schedulers: Callable[[Celery], PgScheduler]
) -> None:
    s = schedulers(_app(db_url))
    s.tick()
    beat.disable_entry(db_url, "tick")
    _rewind(db, "tick", 30)
    s.tick()
    assert _messages(db) == []
    entry = beat.enable_entry(db_url, "tick")
    assert entry.enabled
    assert entry.last_run_at > datetime.now(UTC) - timedelta(seconds=5)
    s.tick()
    assert _messages(db) == []  # the 30 missed runs are not sent
    with pytest.raises(EntryNotFound):
        beat.disable_entry(db_url, "nope")
    beat.remove_entry(db_url, "tick")
    assert beat.list_entries(db_url) == []


def test_bad_configuration_is_refused_at_start(db_url: str) -> None:
    lazy = BeatLazyFunc(datetime.now)
    app = _app(db_url, {"x": {"task": TASK, "schedule": 1.0, "args": [lazy]}})
    with pytest.raises(ConfigurationError, match="cannot be stored as JSON"):
        PgScheduler(app=app)
    with pytest.raises(ConfigurationError, match="needs a PostgreSQL database"):
        PgScheduler(app=_app("memory://"))
    with pytest.raises(ConfigurationError, match="pgbroker_beat_catchup"):
        PgScheduler(app=_app(db_url, pgbroker_beat_catchup=-1))
