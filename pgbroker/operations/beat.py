"""A celery beat scheduler that keeps the schedule in PostgreSQL.

Run it with::

    celery -A proj beat -S pgbroker

(``pgbroker`` is registered in Celery's ``celery.beat_schedulers`` entry
point group; the full path ``pgbroker.operations.beat:PgScheduler`` works too, and so
does ``beat_scheduler = "pgbroker"`` in the app's configuration). Run it
on several machines at once: one process is the leader and sends the
periodic tasks; the others are standbys that take over when the leader dies.

Where the schedule lives (Celery settings)

``pgbroker_beat_url``
    The database. Default: ``broker_url`` if it is a pgbroker URL
    (postgresql://, postgres://, pgbroker://), else ``result_backend`` if
    it is one.
``pgbroker_beat_schema``
    Default: the ``schema`` of ``broker_transport_options`` when the broker
    is pgbroker, else of ``result_backend_transport_options``, else
    ``pgbroker``. Its ``auto_migrate`` option is followed: the table
    ``<schema>.beat_entry`` (``migrations/004_beat.sql``) is created on
    start. One schedule per schema.
``pgbroker_beat_catchup`` (``300``)
    Seconds. Runs missed while no beat was running (or during a failover)
    are sent late, in order, if their slot is at most this old; older
    missed runs are skipped once (a warning names the skipped period).
``beat_max_loop_interval`` (pgbroker default ``5``)
    The longest sleep between two ticks, so the longest a runtime change
    waits to be seen.

The schedule

Entries of ``beat_schedule`` are written to the table by each process that
becomes the leader: new ones are added, changed ones updated, and entries
that came from ``beat_schedule`` and left it are deleted. A definition is
only written when ``beat_schedule`` changed it, so a runtime change to such
an entry lasts until the code changes it again (``enabled`` is never
touched by ``beat_schedule``). Entries added at runtime are kept.

Interval schedules (seconds, ``timedelta``, ``schedule(run_every)``) and
``crontab`` schedules (evaluated in the app's ``timezone``) are supported;
``solar`` and ``schedule(relative=True)`` are not. ``args``, ``kwargs`` and
``options`` are stored as Kombu JSON: a value JSON cannot hold (such as a
``BeatLazyFunc``) is refused when beat starts.

Change entries at runtime from Python with :func:`add_entry`,
:func:`update_entry`, :func:`disable_entry`, :func:`enable_entry`,
:func:`remove_entry` and :func:`list_entries` (each takes the Celery app,
or a URL and ``schema=``), or with SQL on ``<schema>.beat_entry``. There is
no notification: the leader reads the table on every tick (at least every
``beat_max_loop_interval`` seconds; a tick is one small query).

Slots

Each entry has a chain of *slots*, the times it is due: for an interval,
``last_run_at + n * interval``; for a crontab, its matching minutes after
``last_run_at``. ``last_run_at`` is the last slot claimed (not a clock
reading), so every process computes the same slots. The time is the
database server's clock, so beat hosts with skewed clocks agree. Each
message carries its slot in the ``pgbroker_beat_slot`` header (ISO 8601):
read it in the task as ``self.request.pgbroker_beat_slot``, for example as
an idempotency key.

High availability

The leader holds a session advisory lock on its connection (one lock per
schema). Every standby tries to take it once a second. When the leader's
process dies, Postgres closes its session and releases the lock, and a
standby takes over within about a second (measured: 0.9 s from the SIGKILL
of the leader to the standby's "now the leader" log line, on a loaded
2-core machine). A leader that stops normally (SIGTERM) releases the lock
as it exits. A leader whose machine vanishes without closing its TCP
connection keeps the lock until the server notices: set TCP keepalives
(``?keepalives_idle=5&keepalives_interval=2&keepalives_count=3`` in the
URL, or the server's ``tcp_keepalives_*``) to bound that. A leader that
loses its connection stops sending and becomes a standby.

The guarantee

Every slot is claimed by one UPDATE (``... SET last_run_at = slot WHERE
last_run_at < slot AND enabled AND version = v``): a slot is claimed at most
once, whatever the number of beat processes, leaders or not. A new leader
continues from the recorded ``last_run_at`` and sends the runs missed during
the failover (within ``pgbroker_beat_catchup``).

* Broker is pgbroker on the same database and schema (the default when the
  broker URL is the beat URL): the claim and the message are written in
  **one transaction** on the broker connection's session (the publish is
  not retried inside it). Each slot is published exactly once: if the
  leader dies (or its connection drops, even during COMMIT) before the
  commit, neither the claim nor the message exists and the next leader
  sends the slot; after it, both exist. No duplicate and no gap, even at
  the kill instant. (A worker then runs the message with the broker's usual
  guarantees.)
* Any other broker: the claim commits first, then the message is published
  (with Celery's publish retries). If publishing raises, the claim is given
  back and the slot is sent on a later tick. Two windows remain: if the
  leader dies (or loses the database) *between* the claim's commit and
  the broker accepting the message, that slot is lost; if the publish
  raises although the broker kept the message (its reply was lost), the
  slot is sent again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import celery
import psycopg
from celery.beat import ScheduleEntry, Scheduler
from celery.schedules import crontab, schedule
from kombu.utils import json as kjson

from pgbroker.appconfig import app_database
from pgbroker.database import queries
from pgbroker.database import schema as pg_schema
from pgbroker.database.sessions import connect
from pgbroker.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    EntryExists,
    EntryNotFound,
)
from pgbroker.options import TEN_YEARS, schema_name, seconds
from pgbroker.urls import mask_password, to_conninfo

logger = logging.getLogger("pgbroker.operations")

DEFAULT_CATCHUP = 300.0
#: The header that carries a run's slot.
SLOT_HEADER = "pgbroker_beat_slot"
#: Most messages sent in one tick; the next tick follows at once.
MAX_SENDS_PER_TICK = 100
_CRON_FIELDS = ("minute", "hour", "day_of_week", "day_of_month", "month_of_year")


# --- configuration ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BeatConfig:
    url: str = dataclasses.field(repr=False)  # holds the password
    schema: str = "pgbroker"
    auto_migrate: bool = True
    catchup: float = DEFAULT_CATCHUP

    @classmethod
    def from_app(cls, app: Any) -> BeatConfig:
        """Where an app's schedule lives (see the module docstring)."""
        conf = app.conf
        db = app_database(conf, "beat", "pgbroker's beat scheduler")
        catchup = seconds(
            "",
            "pgbroker_beat_catchup",
            conf.get("pgbroker_beat_catchup", DEFAULT_CATCHUP),
            zero="0: skip every missed run",
            maximum=TEN_YEARS,
        )
        return cls(url=db.url, schema=db.schema, auto_migrate=db.auto_migrate, catchup=catchup)


def _open(config: BeatConfig) -> psycopg.Connection:
    conn = connect(config.url)
    try:
        if config.auto_migrate:
            pg_schema.migrate(conn, config.schema)
        else:
            pg_schema.require_current(conn, config.schema)
    except BaseException:
        conn.close()
        raise
    return conn


def _sql(config: BeatConfig) -> dict[str, Any]:
    return queries.for_schema(config.schema, "beat.sql")


# --- schedules ----------------------------------------------------------------------


def schedule_columns(value: Any) -> dict[str, Any]:
    """The table columns of a schedule: seconds, a timedelta, an interval
    ``schedule`` or a ``crontab``."""
    columns: dict[str, Any] = {"interval_seconds": None}
    columns.update({f"cron_{f}": None for f in _CRON_FIELDS})
    if isinstance(value, crontab):
        for f in _CRON_FIELDS:
            columns[f"cron_{f}"] = _cron_text(getattr(value, f"_orig_{f}"))
        return columns
    if isinstance(value, schedule) and type(value) is schedule:
        if value.relative:
            raise ConfigurationError("beat: schedule(relative=True) is not supported")
        value = value.run_every
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(
            f"beat: unsupported schedule {value!r}: give seconds (> 0), a timedelta, "
            "celery.schedules.schedule(run_every) or a crontab"
        )
    columns["interval_seconds"] = float(value)
    return columns


def _cron_text(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, int):
        return str(spec)
    return ",".join(str(v) for v in sorted(spec))


def _schedule_from_columns(row: Sequence[Any], app: Any) -> Any:
    """The Celery schedule of a table row (interval_seconds, cron_*...)."""
    interval, *cron = row
    if interval is not None:
        return schedule(timedelta(seconds=float(interval)), app=app)
    return crontab(*cron, app=app)


#: Celery 5.5 and 5.6: crontab.remaining_delta matches ``last_run_at`` in its
#: own time zone, not the schedule's, and takes the minutes left in its hour
#: only when ``now()`` is the same day (5.7 does neither).
_OLD_CRONTAB = celery.VERSION[:2] < (5, 7)


def next_slot(sched: Any, after: datetime) -> datetime:
    """The first slot of ``sched`` strictly after ``after`` (aware, UTC)."""
    if isinstance(sched, crontab):
        if _OLD_CRONTAB:
            after = after.astimezone(sched.tz)
            pinned = object.__new__(type(sched))
            pinned.__dict__.update(sched.__dict__, nowfun=lambda: after)
            sched = pinned
        last, delta, _now = sched.remaining_delta(after)
        slot: datetime = last + delta
        return slot.astimezone(timezone.utc)
    every: timedelta = sched.run_every
    return (after + every).astimezone(timezone.utc)


def first_slot(
    sched: Any, last_run_at: datetime, now: datetime, catchup: float
) -> tuple[datetime, datetime | None]:
    """The next slot to send and, when slots are skipped, the ``last_run_at``
    that skips them.

    The next slot is the one after ``last_run_at``, unless it is more than
    ``catchup`` seconds older than ``now``: then it is the first slot at or
    after ``now - catchup``, and the older ones are skipped."""
    slot = next_slot(sched, last_run_at)
    horizon = now - timedelta(seconds=catchup)
    if slot >= horizon:
        return slot, None
    if isinstance(sched, crontab):
        skip_to = horizon - timedelta(microseconds=1)
        return next_slot(sched, skip_to), skip_to
    every = sched.run_every
    n = math.ceil((horizon - last_run_at) / every)  # keeps the slots' phase
    slot = (last_run_at + n * every).astimezone(timezone.utc)
    return slot, slot - every


# --- entries ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BeatEntry:
    """One row of ``<schema>.beat_entry``."""

    name: str
    task: str
    schedule: Any
    args: list[Any]
    kwargs: dict[str, Any]
    options: dict[str, Any]
    enabled: bool
    last_run_at: datetime
    total_run_count: int
    version: int
    from_config: bool

    @classmethod
    def from_row(cls, row: Sequence[Any], app: Any = None) -> BeatEntry:
        return cls(
            name=row[0],
            task=row[1],
            schedule=_schedule_from_columns(row[2:8], app),
            args=list(kjson.loads(row[8])),
            kwargs=dict(kjson.loads(row[9])),
            options=dict(kjson.loads(row[10])),
            enabled=bool(row[11]),
            last_run_at=row[12],
            total_run_count=int(row[13]),
            version=int(row[14]),
            from_config=bool(row[15]),
        )

    def to_celery(self, app: Any) -> ScheduleEntry:
        """A celery ScheduleEntry (for introspection; sending uses the table)."""
        return ScheduleEntry(
            name=self.name,
            task=self.task,
            schedule=self.schedule,
            args=tuple(self.args),
            kwargs=self.kwargs,
            options=self.options,
            last_run_at=self.last_run_at,
            total_run_count=self.total_run_count,
            app=app,
        )


def _definition(
    name: str,
    task: str,
    schedule_: Any,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    options: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The parameters of an entry's definition, validated and JSON-encoded."""
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"beat: an entry name must be a non-empty string, got {name!r}")
    if not isinstance(task, str) or not task:
        raise ConfigurationError(f"beat: entry {name!r} needs a task name, got {task!r}")
    params: dict[str, Any] = {"name": name, "task": task, **schedule_columns(schedule_)}
    for key, value, empty in (("args", args, []), ("kwargs", kwargs, {}), ("options", options, {})):
        value = empty if value is None else value
        value = list(value) if key == "args" else dict(value)
        try:
            params[key] = kjson.dumps(value, sort_keys=True)
        except TypeError as exc:
            raise ConfigurationError(
                f"beat: {key} of entry {name!r} cannot be stored as JSON ({exc}); "
                "pass plain values (a BeatLazyFunc cannot be stored)"
            ) from None
    return params


def _config_hash(params: Mapping[str, Any]) -> str:
    text = kjson.dumps({k: v for k, v in params.items() if k != "name"}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# --- the runtime API ----------------------------------------------------------------


def _config_of(target: Any, schema: str | None) -> BeatConfig:
    if schema is not None:
        schema = schema_name("", "schema", schema)
    if isinstance(target, str):
        to_conninfo(target)
        return BeatConfig(url=target, schema=schema or "pgbroker")
    config = BeatConfig.from_app(target)
    return dataclasses.replace(config, schema=schema) if schema else config


@contextlib.contextmanager
def _session(target: Any, schema: str | None) -> Iterator[tuple[psycopg.Connection, Any]]:
    config = _config_of(target, schema)
    with _open(config) as conn:
        yield conn, _sql(config)


def add_entry(
    target: Any,
    name: str,
    task: str,
    schedule: Any,
    *,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    enabled: bool = True,
    schema: str | None = None,
) -> None:
    """Add an entry; its first run is one interval (or the next crontab
    minute) from now. ``target``: the Celery app, or a database URL."""
    params = _definition(name, task, schedule, args, kwargs, options)
    with _session(target, schema) as (conn, q):
        if conn.execute(q["add_entry"], {**params, "enabled": enabled}).fetchone() is None:
            raise EntryExists(f"beat: an entry named {name!r} exists already")


def update_entry(
    target: Any,
    name: str,
    *,
    task: str | None = None,
    schedule: Any = None,
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    enabled: bool | None = None,
    schema: str | None = None,
) -> BeatEntry:
    """Change the given fields of an entry; return it as it is now.

    Enabling a disabled entry restarts its schedule from now (the runs
    missed while disabled are not sent). A changed schedule continues from
    the entry's last run."""
    with _session(target, schema) as (conn, q), conn.transaction():
        row = conn.execute(q["get_entry_for_update"], {"name": name}).fetchone()
        if row is None:
            raise EntryNotFound(name)
        app = None if isinstance(target, str) else target
        old = BeatEntry.from_row(row, app)
        params = _definition(
            name,
            task if task is not None else old.task,
            schedule if schedule is not None else old.schedule,
            args if args is not None else old.args,
            kwargs if kwargs is not None else old.kwargs,
            options if options is not None else old.options,
        )
        params["enabled"] = old.enabled if enabled is None else bool(enabled)
        conn.execute(q["set_entry"], params)
        row = conn.execute(q["get_entry_for_update"], {"name": name}).fetchone()
        assert row is not None
        return BeatEntry.from_row(row, app)


def disable_entry(target: Any, name: str, *, schema: str | None = None) -> BeatEntry:
    """Stop sending an entry (no claim succeeds once this returns)."""
    return update_entry(target, name, enabled=False, schema=schema)


def enable_entry(target: Any, name: str, *, schema: str | None = None) -> BeatEntry:
    return update_entry(target, name, enabled=True, schema=schema)


def remove_entry(target: Any, name: str, *, schema: str | None = None) -> None:
    """Delete an entry. One that is in ``beat_schedule`` comes back when a
    beat process next becomes the leader: disable it instead."""
    with _session(target, schema) as (conn, q):
        if conn.execute(q["remove_entry"], {"name": name}).fetchone() is None:
            raise EntryNotFound(name)


def list_entries(target: Any, *, schema: str | None = None) -> list[BeatEntry]:
    """Every entry, by name."""
    app = None if isinstance(target, str) else target
    with _session(target, schema) as (conn, q):
        return [BeatEntry.from_row(r, app) for r in conn.execute(q["load_entries"]).fetchall()]


# --- the scheduler ------------------------------------------------------------------


class PgScheduler(Scheduler):  # type: ignore[misc]  # Celery ships no types
    """Celery beat scheduler on PostgreSQL, with leader election."""

    #: Longest sleep between ticks when the app sets no beat_max_loop_interval.
    max_interval = 5
    #: How often a standby tries to become the leader (seconds).
    standby_interval = 1.0
    #: Wait after a lost connection before trying again (seconds).
    retry_interval = 1.0

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        self.config = BeatConfig.from_app(app)
        self.q = _sql(self.config)
        self._conn: psycopg.Connection | None = None
        self.is_leader = False
        self._config_rows: list[dict[str, Any]] = []
        self._shared: bool | None = None  # claims share the broker's transaction
        kwargs.pop("schedule_filename", None)  # no file: the table is the store
        super().__init__(app, *args, **kwargs)

    # --- celery's Scheduler interface ------------------------------------------------

    def setup_schedule(self) -> None:
        """Check beat_schedule (so a bad entry stops beat at start) and
        connect; the leader writes it to the table."""
        self.data: dict[str, Any] = {}
        self.install_default_entries(self.data)  # celery.backend_cleanup, when needed
        entries = dict(self.data)
        for name, fields in (self.app.conf.beat_schedule or {}).items():
            entries[name] = self.Entry(**dict(fields, name=name, app=self.app))
        rows = []
        for name, entry in entries.items():
            params = _definition(
                name, entry.task, entry.schedule, entry.args, entry.kwargs, entry.options
            )
            rows.append({**params, "config_hash": _config_hash(params)})
        self._config_rows = rows
        self.data = {}
        try:
            self._connection()
        except DatabaseUnavailable as exc:
            logger.warning("beat: %s; trying again on every tick", exc)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Standby: try to become the leader. Leader: send what is due.
        Returns the seconds to sleep."""
        try:
            if not self._lead():
                return self.standby_interval
            return self._send_due()
        except psycopg.OperationalError as exc:
            if self.is_leader:
                logger.error("beat: lost the database (%s); no longer the leader", exc)
            else:
                logger.warning("beat: database unavailable: %s", exc)
            self._step_down()
            return self.retry_interval

    def sync(self) -> None:
        pass  # every change is written when it happens

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._step_down()

    @property
    def info(self) -> str:
        return f"    . db -> {mask_password(self.config.url)} (schema {self.config.schema})"

    # --- leadership ------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = _open(self.config)
        return self._conn

    def _lead(self) -> bool:
        conn = self._connection()
        if self.is_leader:
            return True
        row = conn.execute(self.q["try_lead"], {"schema": self.config.schema}).fetchone()
        if not (row and row[0]):
            return False
        self.is_leader = True
        logger.warning("beat: this process is now the leader (schema %r)", self.config.schema)
        self._write_config(conn)
        return True

    def _write_config(self, conn: psycopg.Connection) -> None:
        with conn.transaction():
            for params in self._config_rows:
                conn.execute(self.q["upsert_config_entry"], params)
            conn.execute(
                self.q["delete_stale_config_entries"],
                {"names": [p["name"] for p in self._config_rows]},
            )

    def _step_down(self) -> None:
        """Close the session (Postgres releases the lock with it) and the
        broker connection."""
        was_leader, self.is_leader = self.is_leader, False
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                if was_leader and not conn.closed:
                    conn.execute(self.q["resign"], {"schema": self.config.schema})
                    logger.info("beat: no longer the leader")
                conn.close()
        self._reset_producer()

    def _reset_producer(self) -> None:
        self.__dict__.pop("producer", None)
        connection = self.__dict__.pop("connection", None)
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.release()
        self._shared = None

    # --- sending ---------------------------------------------------------------------

    def _send_due(self) -> float:
        started = time.monotonic()
        conn = self._connection()
        row = conn.execute(self.q["now"]).fetchone()
        assert row is not None
        now: datetime = row[0]
        entries = [
            BeatEntry.from_row(r, self.app) for r in conn.execute(self.q["load_entries"]).fetchall()
        ]
        self.data = {e.name: e.to_celery(self.app) for e in entries}
        wake = now + timedelta(seconds=self.max_interval)
        sent = 0
        for entry in entries:
            if not entry.enabled:
                continue
            try:
                slot, skip_to = first_slot(
                    entry.schedule, entry.last_run_at, now, self.config.catchup
                )
            except Exception:
                logger.exception("beat: cannot compute the next run of %r", entry.name)
                continue
            if skip_to is not None:
                params = {"name": entry.name, "version": entry.version, "skip_to": skip_to}
                if conn.execute(self.q["skip_to"], params).rowcount != 1:
                    return 0.0  # changed meanwhile: reload now
                logger.warning(
                    "beat: %r skipped the runs due after %s and before %s, more than "
                    "pgbroker_beat_catchup=%s s ago",
                    entry.name,
                    entry.last_run_at.isoformat(),
                    slot.isoformat(),
                    self.config.catchup,
                )
                entry = dataclasses.replace(entry, last_run_at=skip_to)
            while slot <= now:
                if sent >= MAX_SENDS_PER_TICK:
                    return 0.0
                outcome = self._claim_and_send(entry, slot)
                if outcome == "lost":
                    return 0.0  # changed, disabled or sent elsewhere: reload now
                if outcome == "failed":
                    return self.retry_interval
                sent += 1
                slot = next_slot(entry.schedule, slot)
            wake = min(wake, slot)
        elapsed = time.monotonic() - started
        return max(0.0, min((wake - now).total_seconds() - elapsed, float(self.max_interval)))

    def _claim_and_send(self, entry: BeatEntry, slot: datetime) -> str:
        """Claim ``slot`` of ``entry`` and publish it.

        Returns "sent", "lost" (not claimed: the entry changed or another
        process sent the slot) or "failed" (the broker failed; the slot is
        not claimed and is tried again later). Raises psycopg's
        OperationalError when the schedule's own connection failed."""
        params = {"name": entry.name, "version": entry.version, "slot": slot}
        try:
            shared = self._shared_connection()
            if shared is not None:
                # One transaction: the claim and the message commit together,
                # or neither does.
                with shared.transaction():
                    claimed = shared.execute(self.q["claim_slot"], params).fetchone()
                    if claimed is None:
                        return "lost"
                    self._publish(entry, claimed, slot, retry=False)
                return "sent"
        except Exception as exc:
            self._send_failed(entry, slot, exc)
            return "failed"
        conn = self._connection()
        claimed = conn.execute(self.q["claim_slot"], params).fetchone()
        if claimed is None:
            return "lost"
        try:
            self._publish(entry, claimed, slot, retry=True)
        except Exception as exc:
            # The claim committed on its own: give the slot back.
            conn.execute(
                self.q["unclaim_slot"],
                {"name": entry.name, "slot": slot, "previous": entry.last_run_at},
            )
            self._send_failed(entry, slot, exc)
            return "failed"
        return "sent"

    def _send_failed(self, entry: BeatEntry, slot: datetime, exc: BaseException) -> None:
        logger.error(
            "beat: could not send %r for %s, trying again in %s s: %r",
            entry.name,
            slot.isoformat(),
            self.retry_interval,
            exc,
        )
        # A new broker connection next time; it also forgets declarations
        # that a rolled back transaction undid.
        self._reset_producer()

    def _publish(
        self, entry: BeatEntry, claimed: Sequence[Any], slot: datetime, retry: bool
    ) -> None:
        task, args, kwargs, options, _count = claimed
        options = dict(kjson.loads(options))
        headers = dict(options.pop("headers", None) or {})
        headers["celery_beat_task"] = True
        headers[SLOT_HEADER] = slot.isoformat()
        logger.info(
            "Scheduler: Sending due task %s (%s) for %s", entry.name, task, slot.isoformat()
        )
        sender = self.app.tasks.get(task)
        call_args = list(kjson.loads(args))
        call_kwargs = dict(kjson.loads(kwargs))
        if sender is not None:
            sender.apply_async(
                call_args,
                call_kwargs,
                producer=self.producer,
                headers=headers,
                retry=retry,
                **options,
            )
        else:
            self.app.send_task(
                task,
                call_args,
                call_kwargs,
                producer=self.producer,
                headers=headers,
                retry=retry,
                **options,
            )

    def _shared_connection(self) -> psycopg.Connection | None:
        """The broker transport's psycopg connection when the broker is
        pgbroker on this database and schema, else None."""
        if self._shared is False:
            return None
        transport = self.producer.connection.connection  # established by _ensure_connected
        from pgbroker.broker.transport import Transport  # the broker may be another transport

        if self._shared is None:
            self._shared = (
                isinstance(transport, Transport)
                and transport.options.schema == self.config.schema
                and to_conninfo(transport.url) == to_conninfo(self.config.url)
            )
            logger.info(
                "beat: claims commit %s",
                "in the message's transaction (the broker is this database)"
                if self._shared
                else "before the message is published (the broker is elsewhere)",
            )
        if not self._shared:
            return None
        conn: psycopg.Connection = transport.conn
        return conn
