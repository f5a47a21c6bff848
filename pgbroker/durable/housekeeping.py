"""Housekeeping: how long step records are kept, and :func:`prune`.

When a durable task succeeds, :func:`finish` gives its steps an expiry
(``pgbroker_durable_keep``, or the task's ``durable_keep``; 0 deletes them
at once), and each worker process deletes a batch of expired steps at most
every ``pgbroker_durable_prune_interval`` seconds. :func:`prune` deletes
on demand, including what failed or abandoned tasks left behind.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import psycopg

from pgbroker.database import queries
from pgbroker.durable.config import (
    DurableConfig,
    connection,
    keep_seconds,
    missing_table,
    run_pooled,
    seconds,
)

if TYPE_CHECKING:
    from pgbroker.durable.task import DurableTask

logger = logging.getLogger("pgbroker.durable")

#: Rows deleted per statement by pruning.
PRUNE_BATCH = 1000

_next_prune: dict[tuple[str, str], float] = {}


def _forget_prune_times() -> None:
    _next_prune.clear()  # a forked child prunes on its own schedule


os.register_at_fork(after_in_child=_forget_prune_times)


def finish(task: DurableTask, task_id: str) -> None:
    """Mark a succeeded task's steps for pruning (or delete them), then
    prune expired steps if this process's turn has come."""
    config = task.durable_config
    q = queries.for_schema(config.schema, "durable.sql")
    keep = config.keep
    if task.durable_keep is not None:
        keep = keep_seconds("durable_keep", task.durable_keep)
    if keep == 0:
        run_pooled(config, lambda c: c.execute(q["delete_task"], {"task_id": task_id}))
    else:
        run_pooled(
            config, lambda c: c.execute(q["finish_task"], {"task_id": task_id, "keep": keep})
        )
    _maybe_prune(config)


def _maybe_prune(config: DurableConfig) -> None:
    if not config.prune_interval:
        return
    key = (config.url, config.schema)
    now = time.monotonic()
    if now < _next_prune.get(key, 0.0):
        return
    _next_prune[key] = now + config.prune_interval
    q = queries.for_schema(config.schema, "durable.sql")
    deleted = run_pooled(config, lambda c: c.execute(q["prune_expired"], {"batch": PRUNE_BATCH}))
    if deleted.rowcount:
        logger.info("pgbroker: pruned %d expired durable step(s)", deleted.rowcount)


def prune(
    conn_or_url: psycopg.Connection | str,
    older_than: float | timedelta | None,
    *,
    schema: str = "pgbroker",
) -> int:
    """Delete finished step records; return how many rows went.

    Deletes the steps of succeeded tasks whose keep time has passed, and,
    when ``older_than`` (seconds or a timedelta) is given, the steps of every
    task none of whose steps changed for that long (failed or abandoned
    tasks: they can no longer resume), with events sent, waits timed out and
    runs (of dead sessions) started before that. Runs in batches; on a
    connection that is not in autocommit mode the caller commits.
    """
    q = queries.for_schema(schema, "durable.sql")
    total = 0
    with connection(conn_or_url) as conn:
        try:
            statements: list[tuple[Any, dict[str, Any]]] = [
                (q["prune_expired"], {"batch": PRUNE_BATCH})
            ]
            if older_than is not None:
                age = seconds("older_than", older_than)
                row = conn.execute("SELECT now() - make_interval(secs => %s)", [age]).fetchone()
                assert row is not None
                idle = {"cutoff": row[0], "batch": PRUNE_BATCH}
                for name in ("prune_idle", "prune_events", "prune_idle_waits", "prune_idle_runs"):
                    statements.append((q[name], idle))
            for statement, params in statements:
                while True:
                    deleted = conn.execute(statement, params).rowcount
                    total += deleted
                    if deleted == 0:
                        break
        except psycopg.errors.UndefinedTable:
            raise missing_table(schema) from None
    return total
