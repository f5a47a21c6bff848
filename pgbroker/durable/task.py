"""Durable steps inside a Celery task.

A task built on :class:`DurableTask` runs its side effects through
``self.step(name, fn, *args)``. Each step's output is recorded in
PostgreSQL under (task id, step index) as soon as the step returns; when the
same task id runs again (a Celery retry, or a redelivery after the worker
died), the steps that already completed return their recorded output
without running, and the task carries on from the first step that did not::

    from pgbroker.durable import DurableTask

    @app.task(bind=True, base=DurableTask, acks_late=True)
    def onboard(self, user_id):
        account = self.step("create_account", create_account, user_id)
        self.step("charge", charge_card, account)          # not charged twice
        self.step("welcome_email", send_welcome, account)

Use ``acks_late=True`` (so a task whose worker died is delivered again) and
``task_reject_on_worker_lost=True`` (so does one whose pool process was
killed, e.g. by the OOM killer).

What is guaranteed (docs/durability.md has the full list)
    A step whose checkpoint was committed never runs again for that task id.
    A step run without ``conn=`` is *at least once*: if the process dies
    after the function returned but before its checkpoint was committed, the
    step runs again (give external calls an idempotency key, e.g.
    ``f"{self.request.id}:charge"``). A step run with ``conn=`` is *exactly
    once* for its database work: the work and the checkpoint commit in one
    transaction, and of two runs racing on one task id, only the first to
    commit keeps its work (the other's is rolled back and it gets the first
    one's output).

One run per task id
    A run holds a PostgreSQL advisory lock keyed on its task id, on a pooled
    connection of its own (not the broker's session), from before the body
    starts until it ends. A second run of the same id (a redelivery after
    the broker took the message from a consumer it thought dead) waits for
    the first to end, then replays. Checkpoints are fenced: written on the
    lock's connection, or (``conn=``) in a transaction that share-locks the
    run's ``durable_run`` row and checks its run id; a run whose lock
    session was lost gets :class:`LeaseLost` instead of recording (and, with
    ``acks_late``, its message goes back to the queue). When pgbroker is the
    result backend and it holds SUCCESS for the task id, a new run returns
    the stored result without running the body.

Exclusive keys
    ``@app.task(base=DurableTask, exclusive_key="customer:{customer_id}",
    on_conflict="wait")``: at most one running instance per key (a format
    string over the task's arguments, or a callable taking them). With
    ``"wait"`` the second run waits (up to ``exclusive_timeout`` seconds, then
    :class:`ExclusiveKeyBusy`); with ``"skip"`` it returns ``{"skipped":
    True, "exclusive_key": key, "held_by": task_id}`` without running; with
    ``"retry"`` it asks for a Celery retry in ``exclusive_countdown`` seconds
    (counted against ``max_retries``).

Durable waits
    ``self.wait_for_event(name, timeout=None)`` returns the payload of
    :func:`send_event` ``(app_or_url, name, payload)``; ``self.sleep(name,
    seconds)`` sleeps. A wait that cannot return at once parks: it records
    itself in ``durable_wait`` and ends the run with a Celery retry due at
    the deadline (a delayed message in pgbroker), not counted against
    ``max_retries``, so it holds no worker. ``send_event`` makes the
    waiters' messages ready at once. A timed-out wait raises
    :class:`EventTimeout`. Waits are recorded like steps, so replays are
    deterministic.

Steps

``self.step(name, fn, *args, conn=None, retries=0, backoff=1.0,
max_backoff=60.0, retry_on=(Exception,), **kwargs)`` calls
``fn(*args, **kwargs)``.

* Steps are numbered in call order, from 0. Task code must call the same
  steps in the same order on every run (branch on step outputs, not on the
  clock or random numbers outside steps); a run that reaches a recorded
  index with another step name raises :class:`NonDeterministicWorkflow`.
* ``conn``: a psycopg 3 connection to the database holding pgbroker's
  schema. The function runs and the checkpoint is written in one
  transaction on it: on an autocommit connection, committed when the step
  returns; otherwise a savepoint in the caller's transaction, so both
  commit when the caller commits (``with psycopg.connect(url) as conn:``
  commits at the end of the block) or neither does. Without ``conn``, the
  checkpoint is written through a small per-process connection pool.
* ``retries``, ``backoff``, ``max_backoff``, ``retry_on``: an exception in
  ``retry_on`` runs the function again in this process, up to ``retries``
  more times, after ``backoff * 2**n`` seconds (at most ``max_backoff``).
  With ``conn``, each attempt is its own (sub)transaction, so a failed
  attempt's work is rolled back. Celery's control exceptions (``Retry``,
  ``Ignore``, ``Reject``, ``SoftTimeLimitExceeded``) are never retried. The
  number of attempts and the last error are recorded; a step whose attempts
  all failed is recorded as 'failed' and its exception propagates (so
  Celery's own retry, ``autoretry_for``, applies to the task as usual).

Outputs

Outputs are encoded with the app's ``result_serializer`` (json by default)
and a step returns the *decoded* value on its first run as on a replay, so
both behave the same. With json (Kombu's), dicts, lists, strings, numbers,
booleans, None, bytes, datetimes, UUIDs and Decimals round-trip; tuples come
back as lists and dict keys as strings; sets and other objects are refused
with :class:`StepOutputError` (or use ``result_serializer = "pickle"``, with
pickle in ``accept_content``). Outputs are stored in a bytea column: keep
them small (ids, not documents).

Configuration (Celery settings)

``pgbroker_durable_url``
    The database of the step records. Default: ``broker_url`` if it is a
    pgbroker URL (postgresql://, postgres://, pgbroker://), else
    ``result_backend`` if it is one.
``pgbroker_durable_schema``
    Default: the ``schema`` of ``broker_transport_options`` when the broker
    is pgbroker, else of ``result_backend_transport_options`` when the
    result backend is, else ``pgbroker``. Its ``auto_migrate`` option is
    followed too: the schema is created or upgraded on first use.
``pgbroker_durable_keep`` (``86400``)
    Seconds a succeeded task's steps are kept (to inspect them, and so that
    a crash between success and the message's ack replays instead of
    re-running). ``0`` deletes them when the task succeeds. A task class
    attribute ``durable_keep`` overrides it per task:
    ``@app.task(base=DurableTask, durable_keep=3600)``.
``pgbroker_durable_prune_interval`` (``60``)
    Each worker process deletes expired steps (one batch) after a task
    succeeds, at most this often; ``0`` leaves pruning to :func:`prune`.

Steps of failed tasks are kept (sending the same task id again resumes
it) until :func:`prune` removes tasks idle for longer than a given age.
Rows live in ``<schema>.durable_step`` (``migrations/003_durable_steps.sql``)::

    SELECT task_id, step_index, name, attempts, error
    FROM pgbroker.durable_step WHERE state = 'failed';

Limitations: ``Task.replace()`` keeps the task id, so a durable task must
not be replaced by another durable task. Steps do not nest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from celery import Task
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded
from kombu.serialization import dumps, loads, prepare_accept_content

from pgbroker.appconfig import app_database
from pgbroker.database import pools, queries
from pgbroker.database.sessions import connect, session_lost
from pgbroker.errors import ConfigurationError, PgBrokerError, SchemaError
from pgbroker.options import TEN_YEARS
from pgbroker.options import seconds as check_seconds

logger = logging.getLogger("pgbroker")

T = TypeVar("T")

#: Rows deleted per statement by pruning.
PRUNE_BATCH = 1000
#: Longest exception text recorded for a failed step.
ERROR_MAX = 2000
DEFAULT_KEEP = 86400.0
DEFAULT_PRUNE_INTERVAL = 60.0
#: Connections per process for durable tasks: one per running task (it holds
#: the task's lock), plus a few for housekeeping.
POOL_MAX = 32
#: Longest single park of a waiting task; a longer wait parks again.
PARK_MAX = 86400.0
#: Message header counting a task's parks (waits), which do not count
#: against its max_retries.
PARKS_HEADER = "pgbroker_parks"
ON_CONFLICT = ("wait", "skip", "retry")


class NonDeterministicWorkflow(PgBrokerError):
    """A run of a durable task reached a recorded step index with another
    step name: the task's code does not call the same steps in the same
    order on every run."""


class StepOutputError(PgBrokerError, TypeError):
    """A step's return value cannot be encoded with the result serializer."""


class _AlreadyRecorded(Exception):
    """Another run committed this step first (rolls back ours)."""


class LeaseLost(PgBrokerError):
    """The session holding a running task's lock was lost: another run of the
    task id may own it now, so this run must not record any more steps."""


class EventTimeout(PgBrokerError, TimeoutError):
    """``wait_for_event`` reached its timeout before the event was sent."""


class ExclusiveKeyBusy(PgBrokerError):
    """Another run holds the task's ``exclusive_key`` (``on_conflict`` "wait"
    timed out, or "retry" spent its retries)."""


class DurableWaitError(PgBrokerError):
    """A durable wait was used where a task cannot park (a direct call, an
    eager task)."""


# --- configuration ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DurableConfig:
    url: str = dataclasses.field(repr=False)  # holds the password
    schema: str = "pgbroker"
    auto_migrate: bool = True
    keep: float = DEFAULT_KEEP
    prune_interval: float = DEFAULT_PRUNE_INTERVAL

    @classmethod
    def from_app(cls, app: Any) -> DurableConfig:
        """Where an app's durable steps live (see the module docstring)."""
        conf = app.conf
        db = app_database(conf, "durable", "DurableTask")
        return cls(
            url=db.url,
            schema=db.schema,
            auto_migrate=db.auto_migrate,
            keep=_keep("pgbroker_durable_keep", conf.get("pgbroker_durable_keep", DEFAULT_KEEP)),
            prune_interval=check_seconds(
                "",
                "pgbroker_durable_prune_interval",
                conf.get("pgbroker_durable_prune_interval", DEFAULT_PRUNE_INTERVAL),
                zero="0: leave pruning to pgbroker.durable.prune()",
            ),
        )


def _keep(what: str, value: Any) -> float:
    return check_seconds(
        "", what, value, zero="0: delete them when the task succeeds", maximum=TEN_YEARS
    )


def _seconds(what: str, value: Any) -> float:
    return check_seconds("", what, value, zero="0 allowed", maximum=TEN_YEARS)


# --- one pool per process -----------------------------------------------------------

_next_prune: dict[tuple[str, str], float] = {}


def _forget_prune_times() -> None:
    _next_prune.clear()  # a forked child prunes on its own schedule


os.register_at_fork(after_in_child=_forget_prune_times)


def _pool_for(config: DurableConfig) -> psycopg_pool.ConnectionPool:
    return pools.pool_for(
        config.url,
        config.schema,
        purpose="durable",
        auto_migrate=config.auto_migrate,
        max_size=POOL_MAX,
    )


def close_pools() -> None:
    """Close this process's durable-step connections (tests, shutdown)."""
    pools.close_pools("durable")


def _run(config: DurableConfig, fn: Callable[[psycopg.Connection], T]) -> T:
    """Run ``fn`` on a pooled connection; once more if that one was dead."""
    for attempt in (1, 2):
        try:
            with _pool_for(config).connection() as conn:
                return fn(conn)
        except psycopg.OperationalError as exc:
            # A connection that died while idle in the pool (server restart,
            # pg_terminate_backend): the pool drops it and the retry gets a
            # fresh one. The queries run here are safe to repeat (see
            # sql/durable.sql).
            if attempt == 2 or not session_lost(exc):
                raise
            logger.warning("pgbroker: durable step connection lost, retrying once")
            _pool_for(config).check()  # its other idle sessions may be gone too
    raise AssertionError("unreachable")


# --- one run of a task: its lock and its connection ---------------------------------


@dataclasses.dataclass
class _Run:
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
        because = f" ({_describe(cause)})" if cause is not None else ""
        return LeaseLost(
            f"task {self.task_name}[{self.task_id}]: the database session holding the task's "
            f"lock was lost{because}, so another run of this task id may be running; this run "
            "stops without recording more steps. With acks_late=True its message goes back "
            "to the queue and the next run replays the recorded steps"
        )


def _lock_name(schema: str, kind: str, value: str) -> str:
    # Scoped by schema: two pgbroker schemas in one database never share locks.
    return f"{schema}:{kind}:{value}"


def _begin_run(config: DurableConfig, task_id: str, task_name: str) -> _Run:
    """Take the task id's lock on a connection of the run's own (waiting for
    another run of the same id to end), and record this run as the owner."""
    pool = _pool_for(config)
    q = queries.for_schema(config.schema, "durable.sql")
    lock = {"lock": _lock_name(config.schema, "task", task_id)}
    for attempt in (1, 2):
        conn = pool.getconn()
        try:
            run = _Run(config, conn, task_id, task_name, str(uuid.uuid4()))
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
            logger.warning("pgbroker: durable task connection lost, retrying once")
            pool.check()  # its other idle sessions may be gone too
        except BaseException:
            _discard(pool, conn)
            raise
    raise AssertionError("unreachable")


def _end_run(run: _Run) -> None:
    """Release the run's locks and give its connection back."""
    pool = _pool_for(run.config)
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


# --- the task class -----------------------------------------------------------------


@dataclasses.dataclass
class _Step:
    task: DurableTask
    task_id: str
    index: int
    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    retries: int
    backoff: float
    max_backoff: float
    retry_on: tuple[type[BaseException], ...]

    @property
    def where(self) -> str:
        return f"task {self.task.name}[{self.task_id}] step {self.index} ({self.name!r})"


#: Never retried in-process nor recorded as a failure: Celery's control flow.
_CONTROL = (Retry, Ignore, Reject, SoftTimeLimitExceeded, NonDeterministicWorkflow)


class DurableTask(Task):  # type: ignore[misc]
    """A Celery task whose ``self.step(...)`` calls are checkpointed in
    PostgreSQL (see :mod:`pgbroker.durable`)."""

    #: Seconds to keep a succeeded task's steps; None: the app's
    #: ``pgbroker_durable_keep`` (one day by default).
    durable_keep: float | None = None

    #: At most one running instance per key: a format string over the task's
    #: arguments (``"customer:{customer_id}"``) or a callable taking them.
    exclusive_key: str | Callable[..., str] | None = None
    #: What a run does when another run holds its key: "wait", "skip" or
    #: "retry" (see the module docstring).
    on_conflict: str = "wait"
    #: "wait": longest wait for the key, in seconds (None: no limit).
    exclusive_timeout: float | None = None
    #: "retry": the countdown of the Celery retry, in seconds.
    exclusive_countdown: float = 10.0

    _durable_config: DurableConfig | None = None

    @property
    def durable_config(self) -> DurableConfig:
        if self._durable_config is None:
            self._durable_config = DurableConfig.from_app(self.app)
        return self._durable_config

    # --- a run: exclusive per task id ------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        task_id = request.id
        if not task_id or request.called_directly:
            return super().__call__(*args, **kwargs)  # a plain function call
        run = _begin_run(self.durable_config, task_id, self.name)
        try:
            found, value = self._stored_success(task_id)
            if found:
                logger.info(
                    "task %s[%s] already succeeded (result stored): not run again",
                    self.name,
                    task_id,
                )
                return value
            if self.exclusive_key is not None:
                skipped = self._take_exclusive_key(run, args, kwargs)
                if skipped is not None:
                    return skipped
            request._durable_run = run  # copied into the request the body sees
            try:
                return super().__call__(*args, **kwargs)
            except LeaseLost as exc:
                logger.error("%s", exc)
                if self.acks_late and not request.is_eager:
                    raise Reject(exc, requeue=True) from exc
                raise
        finally:
            request._durable_run = None
            _end_run(run)

    def _current_run(self, task_id: str) -> _Run | None:
        run = getattr(self.request, "_durable_run", None)
        return run if isinstance(run, _Run) and run.task_id == task_id else None

    def _stored_success(self, task_id: str) -> tuple[bool, Any]:
        """(True, result) if the result backend holds SUCCESS for this task
        id (pgbroker's result backend only: it is the one we can trust to
        keep a SUCCESS final and to read without side effects)."""
        from pgbroker.results.backend import PostgresBackend

        backend = self.backend
        if not isinstance(backend, PostgresBackend):
            return False, None
        meta = backend._get_task_meta_for(task_id)
        if meta.get("status") == "SUCCESS":
            return True, meta.get("result")
        return False, None

    # --- exclusive keys --------------------------------------------------------------

    def _exclusive_key_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        # From the class: a function set as a class attribute would be bound.
        spec = type(self).exclusive_key
        if callable(spec):
            key = spec(*args, **kwargs)
        else:
            try:
                bound = inspect.signature(self.run).bind(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"task {self.name}: {exc}") from None
            bound.apply_defaults()
            try:
                key = str(spec).format(**bound.arguments)
            except (KeyError, IndexError, AttributeError) as exc:
                raise ConfigurationError(
                    f"task {self.name}: exclusive_key {spec!r} names {exc}, which is not an "
                    f"argument of the task (its arguments: {', '.join(bound.arguments)})"
                ) from None
        if not isinstance(key, str) or not key:
            raise ConfigurationError(
                f"task {self.name}: exclusive_key gave {key!r}; it must give a non-empty string"
            )
        return key

    def _take_exclusive_key(
        self, run: _Run, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Take the run's exclusive key; None when taken, else what a skipped
        run returns (or raise: retry, or a wait that timed out)."""
        if self.on_conflict not in ON_CONFLICT:
            raise ConfigurationError(
                f"task {self.name}: on_conflict must be one of {', '.join(ON_CONFLICT)}, "
                f"got {self.on_conflict!r}"
            )
        key = self._exclusive_key_for(args, kwargs)
        config = self.durable_config
        q = queries.for_schema(config.schema, "durable.sql")
        lock = {"lock": _lock_name(config.schema, "key", key)}
        row = run.execute(q["try_lock"], lock).fetchone()
        if not (row and row[0]):
            holder_row = run.execute(
                q["key_holder"], {"exclusive_key": key, "task_id": run.task_id}
            ).fetchone()
            holder = holder_row[0] if holder_row else None
            where = f"task {self.name}[{run.task_id}]: exclusive key {key!r} is held by " + (
                f"task {holder}" if holder else "another run"
            )
            if self.on_conflict == "skip":
                logger.info("%s: skipped (on_conflict='skip')", where)
                return {"skipped": True, "exclusive_key": key, "held_by": holder}
            if self.on_conflict == "retry":
                countdown = _seconds("exclusive_countdown", self.exclusive_countdown)
                logger.info("%s: retrying in %s s (on_conflict='retry')", where, countdown)
                raise self.retry(
                    countdown=countdown,
                    exc=ExclusiveKeyBusy(f"{where}; gave up after {self.request.retries} retries"),
                )
            timeout = self.exclusive_timeout
            limit = (
                "0"
                if timeout is None
                else f"{int(_seconds('exclusive_timeout', timeout) * 1000)}ms"
            )
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

    # --- retries: parks do not count -------------------------------------------------

    def _parks(self) -> int:
        try:
            return max(0, int(self.request.get(PARKS_HEADER) or 0))
        except (TypeError, ValueError):
            return 0

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Any:
        """Celery's ``retry``, except that the task's parks (durable waits,
        which are retries too) do not count against ``max_retries``."""
        parks = self._parks()
        if not parks:
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        limit = self.max_retries if max_retries is None else max_retries
        headers = {**(self.request.headers or {}), **(options.pop("headers", None) or {})}
        options["headers"] = {**headers, PARKS_HEADER: parks}
        had_override = "override_max_retries" in self.__dict__
        try:
            return super().retry(
                args,
                kwargs,
                exc,
                throw,
                eta,
                countdown,
                None if limit is None else limit + parks,
                **options,
            )
        finally:
            # Celery keeps the limit given to retry() on the task object for
            # autoretry; ours includes this request's parks, so drop it.
            if not had_override:
                self.__dict__.pop("override_max_retries", None)

    def _park(self, run: _Run, seconds: float, reason: str, event: str | None) -> Retry:
        """End this run without holding a worker: publish the task again,
        due in ``seconds`` (a delayed message in pgbroker), not counted as a
        retry. Returns the Retry to raise."""
        request = self.request
        if request.is_eager:
            raise DurableWaitError(
                f"task {self.name}[{run.task_id}]: {reason}, but an eager task (apply(), "
                "task_always_eager) cannot park; run it on a worker"
            )
        parks = self._parks() + 1
        headers = {**(request.headers or {}), PARKS_HEADER: parks}
        sig = self.signature_from_request(
            request, countdown=seconds, retries=request.retries + 1, headers=headers
        )
        sig.apply_async()
        if event is not None:
            self._wake_self_if_sent(run, event)
        logger.info(
            "task %s[%s]: %s; parked for up to %.0f s", self.name, run.task_id, reason, seconds
        )
        return Retry(f"{reason} (parked, not holding a worker)", when=seconds, sig=sig)

    def _wake_self_if_sent(self, run: _Run, event: str) -> None:
        # send_event may have looked for our delayed message before it was
        # committed: under the event's lock, one of us sees the other.
        config = self.durable_config
        q = queries.for_schema(config.schema, "durable.sql")
        with run.conn.transaction():
            run.execute(q["event_lock"], {"lock": _lock_name(config.schema, "event", event)})
            run.execute(
                q["wake_self"], {"task_id": run.task_id, "name": event, "channel": config.schema}
            )

    # --- durable waits ---------------------------------------------------------------

    def wait_for_event(self, name: str, timeout: float | timedelta | None = None) -> Any:
        """The payload of event ``name`` (see :func:`send_event`), waiting up
        to ``timeout`` seconds (None: no limit) without holding a worker;
        :class:`EventTimeout` when it does not come in time."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"wait_for_event(): the name must be a non-empty string, got {name!r}")
        seconds = None if timeout is None else _seconds("wait_for_event timeout", timeout)
        return self._wait("event", name, seconds)

    def sleep(self, name: str, seconds: float | timedelta) -> None:
        """Sleep ``seconds`` without holding a worker: the run parks and the
        task resumes when the time is up. Recorded like a step named
        ``name``, so a replay does not sleep again."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"sleep(): the name must be a non-empty string, got {name!r}")
        self._wait("sleep", name, _seconds("sleep seconds", seconds))

    def _wait(self, kind: str, name: str, seconds: float | None) -> Any:
        request = self.request
        task_id = request.id
        run = self._current_run(task_id) if task_id else None
        what = f"wait_for_event({name!r})" if kind == "event" else f"sleep({name!r})"
        if run is None:
            raise DurableWaitError(
                f"{what} needs a task run by a worker (or apply()), not a direct call"
            )
        index = getattr(request, "durable_step_index", 0)
        request.durable_step_index = index + 1
        step = _Step(self, task_id, index, f"{kind}:{name}", _no_fn, (), {}, 0, 0.0, 0.0, ())
        config = self.durable_config
        q = queries.for_schema(config.schema, "durable.sql")
        key = {"task_id": task_id, "step_index": index}
        row = run.execute(q["get_step"], key).fetchone()
        if row is not None and row[1] == "done":
            return self._outcome(step, self._replay(step, row), seconds)
        params = {**key, "task_name": self.name, "kind": kind, "name": name, "seconds": seconds}
        found = run.execute(q["begin_wait"], params).fetchone()
        assert found is not None
        arrived, data, content_type, content_encoding, due, left = found
        if arrived:
            outcome: dict[str, Any] = {"payload": self._load(data, content_type, content_encoding)}
        elif due:
            outcome = {"timeout": True} if kind == "event" else {}
        else:
            park = PARK_MAX if left is None else min(max(float(left), 0.0), PARK_MAX)
            reason = f"waiting for event {name!r}" if kind == "event" else f"sleeping ({name!r})"
            raise self._park(run, park, reason, name if kind == "event" else None)
        payload = self._encode(step, outcome)
        with run.conn.transaction():
            stored = run.execute(
                q["record_done"], self._record_params(step, payload, 1, None)
            ).fetchone()
            run.execute(q["end_wait"], key)
        if stored is None:  # cannot happen while we hold the lock; be safe
            row = run.execute(q["get_step"], key).fetchone()
            assert row is not None
            return self._outcome(step, self._replay(step, row), seconds)
        return self._outcome(step, self._decode(payload), seconds)

    def _outcome(self, step: _Step, outcome: Any, seconds: float | None) -> Any:
        if isinstance(outcome, dict) and outcome.get("timeout"):
            raise EventTimeout(
                f"{step.where}: no event {step.name.partition(':')[2]!r} within the timeout "
                f"({seconds} s); send_event() it earlier, or catch EventTimeout"
            )
        if isinstance(outcome, dict):
            return outcome.get("payload")
        return None

    def step(
        self,
        name: str,
        fn: Callable[..., T],
        *args: Any,
        conn: psycopg.Connection | None = None,
        retries: int = 0,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
        **kwargs: Any,
    ) -> T:
        """Run ``fn(*args, **kwargs)`` once for this task id; return its
        output, recorded (see :mod:`pgbroker.durable`)."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"step(): the name must be a non-empty string, got {name!r}")
        if not callable(fn):
            raise TypeError(f"step({name!r}): {fn!r} is not callable")
        if conn is not None and not isinstance(conn, psycopg.Connection):
            raise TypeError(
                f"step({name!r}): conn must be a psycopg 3 (sync) Connection, "
                f"got {type(conn).__name__}"
            )
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"step({name!r}): retries must be an integer >= 0")
        if backoff < 0 or max_backoff < 0:
            raise ValueError(f"step({name!r}): backoff and max_backoff must be >= 0")
        request = self.request
        # Numbered per run: a new request (retry, redelivery) starts at 0.
        index = getattr(request, "durable_step_index", 0)
        request.durable_step_index = index + 1
        step = _Step(
            task=self,
            task_id=request.id,
            index=index,
            name=name,
            fn=fn,
            args=args,
            kwargs=kwargs,
            retries=retries,
            backoff=float(backoff),
            max_backoff=float(max_backoff),
            retry_on=retry_on if isinstance(retry_on, tuple) else (retry_on,),
        )
        if not step.task_id:
            # Called directly (onboard(1)), not as a task: nothing to resume.
            value, _, _ = self._attempts(step, _in_transaction(step, conn))
            return value  # type: ignore[no-any-return]
        if conn is None:
            return self._step_pooled(step)  # type: ignore[no-any-return]
        return self._step_in_transaction(step, conn)  # type: ignore[no-any-return]

    # --- running a step --------------------------------------------------------------

    def _execute(self, step: _Step, query: Any, params: dict[str, Any]) -> Any:
        """One statement for ``step``, and its first row: on the run's own
        connection (which holds the task's lock, so a checkpoint written
        there is fenced: it fails if the lock's session is gone), else on a
        pooled one."""
        run = self._current_run(step.task_id)
        if run is not None:
            return _first_row(run.execute(query, params))
        return _run(self.durable_config, lambda c: _first_row(c.execute(query, params)))

    def _step_pooled(self, step: _Step) -> Any:
        config = self.durable_config
        q = queries.for_schema(config.schema, "durable.sql")
        key = {"task_id": step.task_id, "step_index": step.index}
        row = self._execute(step, q["get_step"], key)
        if row is not None and row[1] == "done":
            return self._replay(step, row)
        value, attempts, error = self._attempts(step)
        try:
            payload = self._encode(step, value)
        except StepOutputError as exc:
            self._record_failure(step, attempts, _describe(exc))
            raise
        params = self._record_params(step, payload, attempts, error)
        stored = self._execute(step, q["record_done"], params)
        if stored is None:
            # Another run of this task recorded the step first: use its
            # output, so that every run goes on with the same value.
            row = self._execute(step, q["get_step"], key)
            assert row is not None and row[1] == "done"
            return self._replay(step, row)
        logger.debug("%s done after %d attempt(s)", step.where, attempts)
        return self._decode(payload)

    def _step_in_transaction(self, step: _Step, conn: psycopg.Connection) -> Any:
        config = self.durable_config
        _pool_for(config)  # the schema exists (migrated by a connection of ours)
        q = queries.for_schema(config.schema, "durable.sql")
        key = {"task_id": step.task_id, "step_index": step.index}
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            raise psycopg.errors.InFailedSqlTransaction(
                f"{step.where}: the connection passed as conn= is in a failed transaction; "
                "roll it back first"
            )
        try:
            row = conn.execute(q["get_step"], key).fetchone()
        except psycopg.errors.UndefinedTable:
            raise ConfigurationError(
                f"{step.where}: conn= is connected to database {conn.info.dbname!r}, which has "
                f"no table {config.schema}.durable_step: pass a connection to the database of "
                "the step records (the broker's, or pgbroker_durable_url)"
            ) from None
        if row is not None and row[1] == "done":
            return self._replay(step, row)

        run = self._current_run(step.task_id)
        fence = {"task_id": step.task_id, "run_id": run.run_id if run else None}

        def run_and_record(attempt: int, error: str | None) -> tuple[bytes, str, str]:
            # One attempt: the function's work and the checkpoint, together.
            with conn.transaction():
                if run is not None and conn.execute(q["check_fence"], fence).fetchone() is None:
                    # Another run took the task over: neither our work nor
                    # our checkpoint may commit.
                    raise run.lost()
                value = step.fn(*step.args, **step.kwargs)
                payload = self._encode(step, value)
                params = self._record_params(step, payload, attempt, error)
                if conn.execute(q["record_done"], params).fetchone() is None:
                    raise _AlreadyRecorded
            return payload

        try:
            payload, _, _ = self._attempts(step, run_and_record)
        except _AlreadyRecorded:
            row = self._execute(step, q["get_step"], key)
            assert row is not None and row[1] == "done"
            logger.info("%s: another run of the task recorded it first", step.where)
            return self._replay(step, row)
        return self._decode(payload)

    def _attempts(
        self, step: _Step, attempt: Callable[[int, str | None], Any] | None = None
    ) -> tuple[Any, int, str | None]:
        """Call the step until it returns or its retries are spent; return
        (value, attempts made, last error or None). ``attempt`` (default: call
        the function) gets the attempt's number and the previous error."""
        call = attempt or (lambda number, error: step.fn(*step.args, **step.kwargs))
        error: str | None = None
        for number in range(1, step.retries + 2):
            try:
                return call(number, error), number, error
            except (*_CONTROL, _AlreadyRecorded, LeaseLost):
                raise
            except Exception as exc:
                error = _describe(exc)
                # An output the serializer refuses would be refused again.
                retriable = isinstance(exc, step.retry_on) and not isinstance(exc, StepOutputError)
                if not retriable or number > step.retries:
                    self._record_failure(step, number, error)
                    raise
                delay = min(step.backoff * 2 ** (number - 1), step.max_backoff)
                logger.warning(
                    "%s failed (attempt %d of %d): %s; retrying in %.2f s",
                    step.where,
                    number,
                    step.retries + 1,
                    error,
                    delay,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _record_failure(self, step: _Step, attempts: int, error: str) -> None:
        if not step.task_id:
            return
        config = self.durable_config
        q = queries.for_schema(config.schema, "durable.sql")
        params = {
            "task_id": step.task_id,
            "step_index": step.index,
            "name": step.name,
            "task_name": self.name,
            "attempts": attempts,
            "error": error,
        }
        try:
            self._execute(step, q["record_failed"], params)
        except Exception as exc:  # the step's own exception matters more
            logger.warning("%s: could not record the failure: %s", step.where, exc)

    def _replay(self, step: _Step, row: tuple[Any, ...]) -> Any:
        recorded_name, _, output, content_type, content_encoding = row
        if recorded_name != step.name:
            raise NonDeterministicWorkflow(
                f"task {self.name}[{step.task_id}]: step {step.index} is {step.name!r} in this "
                f"run, but an earlier run recorded step {step.index} as {recorded_name!r}. "
                "A durable task must call the same steps in the same order on every run "
                "(do not branch on time, randomness or outside state except through step "
                "outputs); to change a task's steps, give the new version another task name"
            )
        logger.info("%s replayed from its checkpoint", step.where)
        return self._load(output, content_type, content_encoding)

    def _record_params(
        self, step: _Step, payload: tuple[bytes, str, str], attempts: int, error: str | None
    ) -> dict[str, Any]:
        output, content_type, content_encoding = payload
        return {
            "task_id": step.task_id,
            "step_index": step.index,
            "name": step.name,
            "task_name": self.name,
            "output": output,
            "content_type": content_type,
            "content_encoding": content_encoding,
            "attempts": attempts,
            "error": error,
        }

    # --- encoding --------------------------------------------------------------------

    def _encode(self, step: _Step, value: Any) -> tuple[bytes, str, str]:
        serializer = self.app.conf.result_serializer
        try:
            content_type, content_encoding, payload = dumps(value, serializer=serializer)
        except Exception as exc:
            raise StepOutputError(
                f"{step.where} returned a {type(value).__name__!r} value that the result "
                f"serializer {serializer!r} cannot encode ({exc}): return plain data (with "
                "json: dict, list, str, int, float, bool, None), or set "
                "result_serializer = 'pickle'"
            ) from exc
        if isinstance(payload, str):
            payload = payload.encode(content_encoding or "utf-8")
        return payload, content_type, content_encoding

    def _decode(self, payload: tuple[bytes, str, str]) -> Any:
        return self._load(*payload)

    def _load(self, data: bytes | None, content_type: str, content_encoding: str) -> Any:
        conf = self.app.conf
        accept = prepare_accept_content(conf.result_accept_content or conf.accept_content)
        return loads(
            bytes(data or b""),
            content_type=content_type,
            content_encoding=content_encoding,
            accept=accept,
        )

    # --- when the task succeeds ------------------------------------------------------

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        """Mark the task's steps for pruning after ``keep`` seconds.

        Subclasses overriding ``on_success`` must call ``super().on_success``.
        """
        super().on_success(retval, task_id, args, kwargs)
        try:
            self._finish(task_id)
        except Exception as exc:  # the task succeeded; this is housekeeping
            logger.warning(
                "task %s[%s]: could not mark its steps done: %s", self.name, task_id, exc
            )

    def _finish(self, task_id: str) -> None:
        config = self.durable_config
        q = queries.for_schema(config.schema, "durable.sql")
        keep = (
            config.keep if self.durable_keep is None else _keep("durable_keep", self.durable_keep)
        )
        if keep == 0:
            _run(config, lambda c: c.execute(q["delete_task"], {"task_id": task_id}))
        else:
            _run(config, lambda c: c.execute(q["finish_task"], {"task_id": task_id, "keep": keep}))
        self._maybe_prune(config)

    def _maybe_prune(self, config: DurableConfig) -> None:
        if not config.prune_interval:
            return
        key = (config.url, config.schema)
        now = time.monotonic()
        if now < _next_prune.get(key, 0.0):
            return
        _next_prune[key] = now + config.prune_interval
        q = queries.for_schema(config.schema, "durable.sql")
        deleted = _run(config, lambda c: c.execute(q["prune_expired"], {"batch": PRUNE_BATCH}))
        if deleted.rowcount:
            logger.info("pgbroker: pruned %d expired durable step(s)", deleted.rowcount)


def _first_row(cur: psycopg.Cursor[Any]) -> Any:
    return cur.fetchone() if cur.description else None


def _no_fn() -> None:
    """The function of a wait's step record (never called)."""


def _in_transaction(
    step: _Step, conn: psycopg.Connection | None
) -> Callable[[int, str | None], Any] | None:
    if conn is None:
        return None

    def attempt(number: int, error: str | None) -> Any:
        with conn.transaction():
            return step.fn(*step.args, **step.kwargs)

    return attempt


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:ERROR_MAX]


# --- inspection and pruning ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One recorded step, as :func:`recorded_steps` returns it."""

    step_index: int
    name: str
    task_name: str | None
    state: str
    output: Any
    attempts: int
    error: str | None
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None


@contextlib.contextmanager
def _connection(conn_or_url: psycopg.Connection | str) -> Iterator[psycopg.Connection]:
    if isinstance(conn_or_url, psycopg.Connection):
        yield conn_or_url
    else:
        with connect(conn_or_url, connect_timeout=10) as conn:
            yield conn


def _missing_table(schema_name: str) -> SchemaError:
    return SchemaError(
        f"schema {schema_name!r} has no durable_step table: run `pgbroker migrate "
        f"--url URL{'' if schema_name == 'pgbroker' else ' --schema ' + schema_name}` "
        "(or start a worker with auto_migrate on)"
    )


def recorded_steps(
    conn_or_url: psycopg.Connection | str,
    task_id: str,
    *,
    schema: str = "pgbroker",
    accept: Any = ("json",),
) -> list[StepRecord]:
    """The recorded steps of one task, in order, outputs decoded."""
    q = queries.for_schema(schema, "durable.sql")
    with _connection(conn_or_url) as conn:
        try:
            rows = conn.execute(q["task_steps"], {"task_id": task_id}).fetchall()
        except psycopg.errors.UndefinedTable:
            raise _missing_table(schema) from None
    allowed = prepare_accept_content(accept)
    found = []
    for index, name, task_name, state, output, ctype, cenc, attempts, error, *times in rows:
        value = (
            loads(bytes(output), content_type=ctype, content_encoding=cenc, accept=allowed)
            if output is not None
            else None
        )
        found.append(StepRecord(index, name, task_name, state, value, attempts, error, *times))
    return found


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
    with _connection(conn_or_url) as conn:
        try:
            statements: list[tuple[Any, dict[str, Any]]] = [
                (q["prune_expired"], {"batch": PRUNE_BATCH})
            ]
            if older_than is not None:
                age = _seconds("older_than", older_than)
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
            raise _missing_table(schema) from None
    return total


# --- events -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SentEvent:
    """What :func:`send_event` did."""

    #: False if an event of that name had been sent before (its first
    #: payload is kept).
    recorded: bool
    #: Tasks waiting on the event.
    waiting: int
    #: Task ids whose parked run was made ready now (the others are between
    #: runs and find the event when they next reach their wait).
    woken: list[str]


def send_event(
    app_or_url: Any,
    name: str,
    payload: Any = None,
    *,
    schema: str | None = None,
    serializer: str | None = None,
) -> SentEvent:
    """Send event ``name`` with ``payload`` to the durable tasks waiting on
    it (``self.wait_for_event(name)``), from any process.

    ``app_or_url``: a Celery app (its durable-step database, schema and
    ``result_serializer``), a PostgreSQL URL, or a psycopg connection (the
    event then commits with the caller's transaction, and the waiters are
    woken when it commits). The event is recorded, and the tasks waiting on
    it are made ready and their queues NOTIFYed, in one transaction. An
    event is kept by name: a task that reaches its wait later gets it at
    once; sending the same name again keeps the first payload.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"send_event(): the name must be a non-empty string, got {name!r}")
    target: psycopg.Connection | str | DurableConfig
    if isinstance(app_or_url, (str, psycopg.Connection)):
        target = app_or_url
        schema_name = schema or "pgbroker"
        serializer = serializer or "json"
    elif hasattr(app_or_url, "conf"):
        config = DurableConfig.from_app(app_or_url)
        target = config
        schema_name = schema or config.schema
        serializer = serializer or app_or_url.conf.result_serializer
    else:
        raise TypeError(
            "send_event(): app_or_url must be a Celery app, a postgresql:// URL or a psycopg "
            f"connection, got {type(app_or_url).__name__}"
        )
    try:
        content_type, content_encoding, data = dumps(payload, serializer=serializer)
    except Exception as exc:
        raise StepOutputError(
            f"send_event({name!r}): the payload cannot be encoded with {serializer!r} ({exc})"
        ) from exc
    if isinstance(data, str):
        data = data.encode(content_encoding or "utf-8")
    q = queries.for_schema(schema_name, "durable.sql")
    params = {
        "name": name,
        "payload": data,
        "content_type": content_type,
        "content_encoding": content_encoding,
        "lock": _lock_name(schema_name, "event", name),
        "channel": schema_name,
    }

    def send(conn: psycopg.Connection) -> SentEvent:
        try:
            with conn.transaction():
                # The lock orders us with a task parking on this event (see
                # DurableTask._wake_self_if_sent).
                conn.execute(q["event_lock"], params)
                recorded = conn.execute(q["record_event"], params).fetchone() is not None
                row = conn.execute(q["wake_waiters"], params).fetchone()
        except psycopg.errors.UndefinedTable:
            raise _missing_table(schema_name) from None
        assert row is not None
        woken = list(row[1] or [])
        logger.info("event %r sent: %d task(s) waiting, %d woken", name, int(row[0]), len(woken))
        return SentEvent(recorded, int(row[0]), woken)

    if isinstance(target, DurableConfig):
        return _run(target, send)
    with _connection(target) as conn:
        return send(conn)


@dataclasses.dataclass(frozen=True)
class WaitRecord:
    """A task waiting for an event or a timer, as :func:`waiting` returns it."""

    task_id: str
    step_index: int
    task_name: str | None
    kind: str
    name: str
    since: datetime
    deadline: datetime | None
    woken_at: datetime | None


def waiting(conn_or_url: psycopg.Connection | str, *, schema: str = "pgbroker") -> list[WaitRecord]:
    """The tasks parked on a durable wait, oldest first."""
    q = queries.for_schema(schema, "durable.sql")
    with _connection(conn_or_url) as conn:
        try:
            rows = conn.execute(q["waits"]).fetchall()
        except psycopg.errors.UndefinedTable:
            raise _missing_table(schema) from None
    return [WaitRecord(*row) for row in rows]
