"""Pruning the history pgbroker keeps, on a schedule the user controls.

Messages need no pruning: a message row is deleted by its ack, and the
sweep removes expired ones. What grows without bound unless pruned is the
history kept for people to read:

==================  ===========================================  ==============
records             pruned when                                  by default
==================  ===========================================  ==============
``redelivery``      logged longer ago than the age given         7 days
``dead_letter``     dead-lettered longer ago than the age given  never (opt in)
``task_result``,    written longer ago than the age given (the   never (opt in)
``group_result``,   result backend already expires them by
``chord``           ``result_expires`` on its own)
``durable_step``    its task succeeded and the app's keep time   always
                    (``pgbroker_durable_keep``) has passed; with
                    an age, also tasks idle for that long
``durable_event``,  with the durable age: events sent, waits     never (opt in)
``durable_wait``,   given up on, runs whose session is gone,
``durable_run``     before it (as ``durable.prune()``)
==================  ===========================================  ==============

Run it from cron (``pgbroker prune``, see docs/operations.md) or from celery
beat with the ``pgbroker.prune`` task defined here::

    app.conf.imports = ["pgbroker.operations.retention"]
    app.conf.beat_schedule = {
        "pgbroker-prune": {
            "task": "pgbroker.prune",
            "schedule": 3600.0,
            "kwargs": {"dead_letters_older_than": "30d"},
        },
    }

Every delete removes one batch (oldest first) in its own transaction, so a
large backlog never holds long locks and a pruning run can be stopped at
any point without losing more than it was asked to delete.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import psycopg
from celery import shared_task

from pgbroker.database import queries
from pgbroker.errors import ConfigurationError, SchemaError
from pgbroker.operations.admin import parse_duration

logger = logging.getLogger("pgbroker.operations")

#: Rows deleted per statement.
BATCH_SIZE = 1000

#: How long the redelivery log is kept unless told otherwise.
DEFAULT_REDELIVERY_AGE = timedelta(days=7)

#: progress(target, done, total): called after each batch.
Progress = Callable[[str, int, int], None]


@dataclasses.dataclass
class Policy:
    """What to prune. An age of None leaves those records alone."""

    redeliveries_older_than: timedelta | None = DEFAULT_REDELIVERY_AGE
    #: Dead letters are messages nobody processed: kept unless asked.
    dead_letters_older_than: timedelta | None = None
    #: Results, saved groups and chord counters last written before this.
    results_older_than: timedelta | None = None
    #: Steps of tasks none of whose steps changed for this long (failed or
    #: abandoned tasks, which can no longer resume).
    durable_idle_older_than: timedelta | None = None
    #: Steps of succeeded tasks whose keep time has passed.
    durable_expired: bool = True


@dataclasses.dataclass
class Pruned:
    """One kind of record: how many matched, how many went."""

    #: The table, with a qualifier when one table has two rules.
    target: str
    #: Records written before this time matched; None for durable_step
    #: (expired), whose rows carry their own expiry time.
    cutoff: datetime | None
    matched: int
    deleted: int


@dataclasses.dataclass
class PruneReport:
    schema: str
    dry_run: bool
    items: list[Pruned]

    @property
    def deleted(self) -> int:
        return sum(i.deleted for i in self.items)

    @property
    def matched(self) -> int:
        return sum(i.matched for i in self.items)


@dataclasses.dataclass
class _Target:
    name: str
    age: timedelta | None
    count: Any
    delete: Any


def _targets(schema: str, policy: Policy) -> list[_Target]:
    admin_q = queries.for_schema(schema, "admin.sql")
    backend_q = queries.for_schema(schema, "backend.sql")
    durable_q = queries.for_schema(schema, "durable.sql")
    found = []
    if policy.redeliveries_older_than is not None:
        found.append(
            _Target(
                "redelivery",
                policy.redeliveries_older_than,
                admin_q["count_redeliveries"],
                admin_q["prune_redeliveries"],
            )
        )
    if policy.dead_letters_older_than is not None:
        found.append(
            _Target(
                "dead_letter",
                policy.dead_letters_older_than,
                admin_q["count_old_dead_letters"],
                admin_q["prune_dead_letters"],
            )
        )
    if policy.results_older_than is not None:
        # The result backend's own expiry queries, with this cutoff.
        for table, count, delete in (
            ("task_result", "count_results", "cleanup_results"),
            ("group_result", "count_groups", "cleanup_groups"),
            ("chord", "count_chords", "cleanup_chords"),
        ):
            found.append(
                _Target(table, policy.results_older_than, admin_q[count], backend_q[delete])
            )
    if policy.durable_expired:
        found.append(
            _Target(
                "durable_step (expired)",
                None,
                admin_q["count_durable_expired"],
                durable_q["prune_expired"],
            )
        )
    if policy.durable_idle_older_than is not None:
        found.append(
            _Target(
                "durable_step (idle)",
                policy.durable_idle_older_than,
                admin_q["count_durable_idle"],
                durable_q["prune_idle"],
            )
        )
        # With the same age, as durable.prune() does: events sent, waits
        # given up on, and rows of runs whose session is gone.
        for table, count, delete in (
            ("durable_event", "count_durable_events", "prune_events"),
            ("durable_wait", "count_durable_waits", "prune_idle_waits"),
            ("durable_run", "count_durable_runs", "prune_idle_runs"),
        ):
            found.append(
                _Target(table, policy.durable_idle_older_than, admin_q[count], durable_q[delete])
            )
    return found


def prune(
    conn: psycopg.Connection,
    schema: str,
    policy: Policy | None = None,
    *,
    dry_run: bool = False,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
) -> PruneReport:
    """Delete the records ``policy`` names; with ``dry_run``, only count them.

    ``conn`` must be in autocommit mode: each batch commits on its own.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if not conn.autocommit:
        raise ValueError("prune() needs an autocommit connection (each batch commits)")
    report = PruneReport(schema=schema, dry_run=dry_run, items=[])
    cutoff_q = queries.for_schema(schema, "admin.sql")["cutoff"]
    try:
        for target in _targets(schema, policy or Policy()):
            cutoff = None
            if target.age is not None:
                row = conn.execute(cutoff_q, {"age": target.age}).fetchone()
                assert row is not None
                cutoff = row[0]
            params = {"cutoff": cutoff, "batch": batch_size}
            counted = conn.execute(target.count, params).fetchone()
            matched = int(counted[0]) if counted else 0
            item = Pruned(target.name, cutoff, matched, 0)
            report.items.append(item)
            if dry_run or matched == 0:
                continue
            while True:
                deleted = conn.execute(target.delete, params).rowcount
                if deleted <= 0:
                    break
                item.deleted += deleted
                if progress is not None:
                    progress(target.name, item.deleted, max(matched, item.deleted))
    except psycopg.errors.UndefinedTable as exc:
        raise SchemaError(
            f"schema {schema!r} lacks a table pruning needs ({exc.diag.message_primary}): "
            "run `pgbroker migrate`"
        ) from None
    if not dry_run and report.deleted:
        logger.info(
            "pgbroker: pruned %s",
            ", ".join(f"{i.deleted} {i.target}" for i in report.items if i.deleted),
        )
    return report


def age(value: Any, what: str) -> timedelta | None:
    """An age given as a duration string (``"7d"``), seconds, a timedelta,
    or None / ``"never"`` for "do not prune these"."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "never"):
        return None
    if isinstance(value, timedelta):
        result = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        result = timedelta(seconds=value)
    elif isinstance(value, str):
        try:
            result = parse_duration(value)
        except ValueError as exc:
            raise ConfigurationError(f"{what}: {exc}") from None
    else:
        raise ConfigurationError(
            f"{what} must be a duration such as '7d', seconds, or 'never'; got {value!r}"
        )
    if result <= timedelta(0):
        raise ConfigurationError(f"{what} must be longer than 0, got {value!r}")
    return result


# --- the celery beat task -----------------------------------------------------------


@shared_task(  # type: ignore[untyped-decorator]  # Celery ships no types
    name="pgbroker.prune", bind=True, ignore_result=True
)
def prune_task(
    self: Any,
    redeliveries_older_than: Any = "7d",
    dead_letters_older_than: Any = None,
    results_older_than: Any = None,
    durable_idle_older_than: Any = None,
    batch_size: int = BATCH_SIZE,
) -> dict[str, int]:
    """``pgbroker prune`` as a task, for ``beat_schedule``.

    The database is the app's (``pgbroker_prune_url`` if set, else the
    broker's URL if it is pgbroker's, else the result backend's); ages are
    durations (``"30d"``), seconds, or ``"never"``. Returns the rows deleted
    per table.
    """
    from pgbroker.appconfig import app_database
    from pgbroker.database.sessions import connect

    where = app_database(self.app.conf, "prune", "the pgbroker.prune task")
    policy = Policy(
        redeliveries_older_than=age(redeliveries_older_than, "redeliveries_older_than"),
        dead_letters_older_than=age(dead_letters_older_than, "dead_letters_older_than"),
        results_older_than=age(results_older_than, "results_older_than"),
        durable_idle_older_than=age(durable_idle_older_than, "durable_idle_older_than"),
    )
    with connect(where.url, connect_timeout=10) as conn:
        report = prune(conn, where.schema, policy, batch_size=batch_size)
    return {i.target: i.deleted for i in report.items}
