"""One run per task id: a run's lock (its lease), fencing, exclusive keys.

A run holds a PostgreSQL session advisory lock keyed on its task id, on a
pooled connection of its own, from before the body starts until it ends
(:func:`begin_run`, :func:`end_run`); a second run of the id waits for it.
Statements on that connection (:meth:`Run.execute`) fail with
:class:`~pgbroker.errors.LeaseLost` once its session is gone. An
``exclusive_key`` is a second advisory lock on the same connection
(:func:`take_exclusive_key`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import socket
import uuid
from typing import TYPE_CHECKING, Any

import psycopg
import psycopg_pool

from pgbroker.database import queries
from pgbroker.durable.config import DurableConfig, pool_for, seconds
from pgbroker.errors import ConfigurationError, ExclusiveKeyBusy, LeaseLost, session_lost
from pgbroker.logs import recovery

if TYPE_CHECKING:
    from pgbroker.durable.task import DurableTask

logger = logging.getLogger("pgbroker.durable")

#: Longest exception text recorded (a failed step, a lost lease).
ERROR_MAX = 2000
ON_CONFLICT = ("wait", "skip", "retry")


@dataclasses.dataclass
class Run:
    """A run of a durable task: a pooled connection of its own holding the
    task id's advisory lock (and the exclusive key's) until the run ends."""

    config: DurableConfig
    conn: psycopg.Connection
    task_id: str
    task_name: str
    run_id: str

    def execute(self, query: Any, params: dict[str, Any]) -> psycopg.Cursor[Any]:
        """Run a statement on the run's connection; a lost session (the
        lock went with it) is :class:`LeaseLost`."""
        try:
            return self.conn.execute(query, params)
        except psycopg.OperationalError as exc:
            if self.conn.closed or self.conn.broken:
                raise self.lost(exc) from exc
            raise

    def lost(self, cause: BaseException | None = None) -> LeaseLost:
        because = f" ({describe(cause)})" if cause is not None else ""
        return LeaseLost(
            f"task {self.task_name}[{self.task_id}]: the database session holding the task's "
            f"lock was lost{because}, so another run of this task id may be running; this run "
            "stops without recording more steps. With acks_late=True its message goes back "
            "to the queue and the next run replays the recorded steps"
        )


def describe(exc: BaseException) -> str:
    """An exception as recorded: its type and message, at most ERROR_MAX long."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:ERROR_MAX]


def lock_name(schema: str, kind: str, value: str) -> str:
    # Scoped by schema: two pgbroker schemas in one database never share locks.
    return f"{schema}:{kind}:{value}"


# --- a run's lock and its connection ------------------------------------------------


def begin_run(config: DurableConfig, task_id: str, task_name: str) -> Run:
    """Take the task id's lock on a connection of the run's own (waiting for
    another run of the same id to end), and record this run as the owner."""
    pool = pool_for(config)
    q = queries.for_schema(config.schema, "durable.sql")
    lock = {"lock": lock_name(config.schema, "task", task_id)}
    for attempt in (1, 2):
        conn = pool.getconn()
        try:
            run = Run(config, conn, task_id, task_name, str(uuid.uuid4()))
            params = {
                **lock,
                "task_id": task_id,
                "run_id": run.run_id,
                "task_name": task_name,
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "locked": False,
            }
            if conn.execute(q["begin_run"], params).fetchone() is None:
                holder = conn.execute(q["lock_holder"], lock).fetchone()
                logger.info(
                    "task %s[%s] is already running (%s): waiting for that run to end",
                    task_name,
                    task_id,
                    f"session {holder[0]}, {holder[1]}" if holder else "another session",
                    extra=recovery("wait_for_run", task_id=task_id, reason="already running"),
                )
                with conn.transaction():
                    # A session lock taken in a transaction outlives it.
                    conn.execute(q["set_lock_timeout"], {"timeout": "0"})
                    conn.execute(q["lock"], lock)
                conn.execute(q["begin_run"], {**params, "locked": True})
            return run
        except psycopg.OperationalError as exc:
            broken = conn.closed or conn.broken
            _discard(pool, conn)
            # A pooled connection that died while idle (server restart): once
            # more on a fresh one. Nothing was locked on it.
            if attempt == 2 or not broken or not session_lost(exc):
                raise
            logger.warning(
                "pgbroker: durable task connection lost, retrying once",
                extra=recovery("session_lost", task_id=task_id, reason=type(exc).__name__),
            )
            pool.check()  # its other idle sessions may be gone too
        except BaseException:
            _discard(pool, conn)
            raise
    raise AssertionError("unreachable")


def end_run(run: Run) -> None:
    """Release the run's locks and give its connection back."""
    pool = pool_for(run.config)
    q = queries.for_schema(run.config.schema, "durable.sql")
    if run.conn.closed or run.conn.broken:
        _discard(pool, run.conn)  # the lease was lost: said when it was found
        return
    try:
        run.conn.execute(q["end_run"], {"task_id": run.task_id, "run_id": run.run_id})
    except Exception as exc:
        # Closing the session releases its locks too.
        logger.warning(
            "task %s[%s]: could not end its run cleanly: %s", run.task_name, run.task_id, exc
        )
        _discard(pool, run.conn)
        return
    pool.putconn(run.conn)


def _discard(pool: psycopg_pool.ConnectionPool, conn: psycopg.Connection) -> None:
    with contextlib.suppress(Exception):
        conn.close()  # ends the session: its advisory locks go with it
    pool.putconn(conn)  # a closed connection is dropped by the pool


def current_run(task: DurableTask, task_id: str) -> Run | None:
    """The run of ``task_id`` that the task's current request is part of."""
    run = getattr(task.request, "_durable_run", None)
    return run if isinstance(run, Run) and run.task_id == task_id else None


def stored_success(task: DurableTask, task_id: str) -> tuple[bool, Any]:
    """(True, result) if the result backend holds SUCCESS for this task
    id (pgbroker's result backend only: it is the one we can trust to
    keep a SUCCESS final and to read without side effects)."""
    from pgbroker.results.backend import PostgresBackend

    backend = task.backend
    if not isinstance(backend, PostgresBackend):
        return False, None
    meta = backend._get_task_meta_for(task_id)
    if meta.get("status") == "SUCCESS":
        return True, meta.get("result")
    return False, None


# --- exclusive keys -----------------------------------------------------------------


def exclusive_key_for(task: DurableTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    # From the class: a function set as a class attribute would be bound.
    spec = type(task).exclusive_key
    if callable(spec):
        key = spec(*args, **kwargs)
    else:
        try:
            bound = inspect.signature(task.run).bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"task {task.name}: {exc}") from None
        bound.apply_defaults()
        try:
            key = str(spec).format(**bound.arguments)
        except (KeyError, IndexError, AttributeError) as exc:
            raise ConfigurationError(
                f"task {task.name}: exclusive_key {spec!r} names {exc}, which is not an "
                f"argument of the task (its arguments: {', '.join(bound.arguments)})"
            ) from None
    if not isinstance(key, str) or not key:
        raise ConfigurationError(
            f"task {task.name}: exclusive_key gave {key!r}; it must give a non-empty string"
        )
    return key


def take_exclusive_key(
    task: DurableTask, run: Run, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any] | None:
    """Take the run's exclusive key; None when taken, else what a skipped
    run returns (or raise: retry, or a wait that timed out)."""
    if task.on_conflict not in ON_CONFLICT:
        raise ConfigurationError(
            f"task {task.name}: on_conflict must be one of {', '.join(ON_CONFLICT)}, "
            f"got {task.on_conflict!r}"
        )
    key = exclusive_key_for(task, args, kwargs)
    config = task.durable_config
    q = queries.for_schema(config.schema, "durable.sql")
    lock = {"lock": lock_name(config.schema, "key", key)}
    row = run.execute(q["try_lock"], lock).fetchone()
    if not (row and row[0]):
        holder_row = run.execute(
            q["key_holder"], {"exclusive_key": key, "task_id": run.task_id}
        ).fetchone()
        holder = holder_row[0] if holder_row else None
        where = f"task {task.name}[{run.task_id}]: exclusive key {key!r} is held by " + (
            f"task {holder}" if holder else "another run"
        )
        if task.on_conflict == "skip":
            logger.info("%s: skipped (on_conflict='skip')", where)
            return {"skipped": True, "exclusive_key": key, "held_by": holder}
        if task.on_conflict == "retry":
            countdown = seconds("exclusive_countdown", task.exclusive_countdown)
            logger.info("%s: retrying in %s s (on_conflict='retry')", where, countdown)
            raise task.retry(
                countdown=countdown,
                exc=ExclusiveKeyBusy(f"{where}; gave up after {task.request.retries} retries"),
            )
        timeout = task.exclusive_timeout
        limit = "0" if timeout is None else f"{int(seconds('exclusive_timeout', timeout) * 1000)}ms"
        logger.info("%s: waiting for it (on_conflict='wait')", where)
        try:
            with run.conn.transaction():
                # A session lock taken in a transaction outlives it.
                run.execute(q["set_lock_timeout"], {"timeout": limit})
                run.execute(q["lock"], lock)
        except psycopg.errors.LockNotAvailable:
            raise ExclusiveKeyBusy(
                f"{where}: still held after waiting {timeout} s (exclusive_timeout); "
                "raise exclusive_timeout, or use on_conflict='retry' or 'skip'"
            ) from None
    run.execute(
        q["set_exclusive_key"],
        {"exclusive_key": key, "task_id": run.task_id, "run_id": run.run_id},
    )
    return None
