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

What is guaranteed
    A step whose checkpoint was committed never runs again for that task id.
    A step run without ``conn=`` is *at least once*: if the process dies
    after the function returned but before its checkpoint was committed, the
    step runs again (give external calls an idempotency key, e.g.
    ``f"{self.request.id}:charge"``). A step run with ``conn=`` is *exactly
    once* for its database work: the work and the checkpoint commit in one
    transaction, and of two runs racing on one task id, only the first to
    commit keeps its work (the other's is rolled back and it gets the first
    one's output).

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
import logging
import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from celery import Task
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded
from kombu.serialization import dumps, loads, prepare_accept_content

from pgbroker import pools, queries
from pgbroker.appconfig import app_database
from pgbroker.db import connect
from pgbroker.errors import ConfigurationError, PgBrokerError, SchemaError

logger = logging.getLogger("pgbroker")

T = TypeVar("T")

#: Rows deleted per statement by pruning.
PRUNE_BATCH = 1000
#: Longest exception text recorded for a failed step.
ERROR_MAX = 2000
DEFAULT_KEEP = 86400.0
DEFAULT_PRUNE_INTERVAL = 60.0


class NonDeterministicWorkflow(PgBrokerError):
    """A run of a durable task reached a recorded step index with another
    step name: the task's code does not call the same steps in the same
    order on every run."""


class StepOutputError(PgBrokerError, TypeError):
    """A step's return value cannot be encoded with the result serializer."""


class _AlreadyRecorded(Exception):
    """Another run committed this step first (rolls back ours)."""


# --- configuration ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DurableConfig:
    url: str
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
            keep=_seconds("pgbroker_durable_keep", conf.get("pgbroker_durable_keep", DEFAULT_KEEP)),
            prune_interval=_seconds(
                "pgbroker_durable_prune_interval",
                conf.get("pgbroker_durable_prune_interval", DEFAULT_PRUNE_INTERVAL),
            ),
        )


def _seconds(what: str, value: Any) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigurationError(f"{what} must be a number of seconds >= 0, got {value!r}")
    return float(value)


# --- one pool per process -----------------------------------------------------------

_next_prune: dict[tuple[str, str], float] = {}


def _forget_prune_times() -> None:
    _next_prune.clear()  # a forked child prunes on its own schedule


os.register_at_fork(after_in_child=_forget_prune_times)


def _pool_for(config: DurableConfig) -> psycopg_pool.ConnectionPool:
    return pools.pool_for(
        config.url, config.schema, purpose="durable", auto_migrate=config.auto_migrate
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
            # A connection broken while idle in the pool (server restart):
            # the pool drops it and the retry gets a fresh one. The queries
            # run here are safe to repeat (see sql/durable.sql).
            if attempt == 2 or exc.sqlstate is not None:
                raise
            logger.warning("pgbroker: durable step connection lost, retrying once")
    raise AssertionError("unreachable")


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

    _durable_config: DurableConfig | None = None

    @property
    def durable_config(self) -> DurableConfig:
        if self._durable_config is None:
            self._durable_config = DurableConfig.from_app(self.app)
        return self._durable_config

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

    def _step_pooled(self, step: _Step) -> Any:
        config = self.durable_config
        q = queries.for_schema(config.schema, "durable.sql")
        key = {"task_id": step.task_id, "step_index": step.index}
        row = _run(config, lambda c: c.execute(q["get_step"], key).fetchone())
        if row is not None and row[1] == "done":
            return self._replay(step, row)
        value, attempts, error = self._attempts(step)
        try:
            payload = self._encode(step, value)
        except StepOutputError as exc:
            self._record_failure(step, attempts, _describe(exc))
            raise
        params = self._record_params(step, payload, attempts, error)
        stored = _run(config, lambda c: c.execute(q["record_done"], params).fetchone())
        if stored is None:
            # Another run of this task recorded the step first: use its
            # output, so that every run goes on with the same value.
            row = _run(config, lambda c: c.execute(q["get_step"], key).fetchone())
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

        def run_and_record(attempt: int, error: str | None) -> tuple[bytes, str, str]:
            # One attempt: the function's work and the checkpoint, together.
            with conn.transaction():
                value = step.fn(*step.args, **step.kwargs)
                payload = self._encode(step, value)
                params = self._record_params(step, payload, attempt, error)
                if conn.execute(q["record_done"], params).fetchone() is None:
                    raise _AlreadyRecorded
            return payload

        try:
            payload, _, _ = self._attempts(step, run_and_record)
        except _AlreadyRecorded:
            row = _run(config, lambda c: c.execute(q["get_step"], key).fetchone())
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
            except (*_CONTROL, _AlreadyRecorded):
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
            _run(config, lambda c: c.execute(q["record_failed"], params))
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
            config.keep
            if self.durable_keep is None
            else _seconds("durable_keep", self.durable_keep)
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
    tasks: they can no longer resume). Runs in batches; on a connection
    that is not in autocommit mode the caller commits.
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
                statements.append((q["prune_idle"], {"cutoff": row[0], "batch": PRUNE_BATCH}))
            for statement, params in statements:
                while True:
                    deleted = conn.execute(statement, params).rowcount
                    total += deleted
                    if deleted == 0:
                        break
        except psycopg.errors.UndefinedTable:
            raise _missing_table(schema) from None
    return total
