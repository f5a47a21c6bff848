"""Steps: run a function once per task id, record its output, replay it.

``DurableTask.step()`` numbers steps in call order (:func:`next_index`),
replays a step recorded as done (:func:`replay`, which also guards against
non-deterministic task code), else runs the function (with its in-process
retries) and records the output under (task id, step index): on the run's
own connection (fenced by its lock), or with ``conn=`` in the caller's
transaction. Outputs go through the app's ``result_serializer``
(:func:`encode`, :func:`load`). :func:`recorded_steps` reads them back.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded
from kombu.serialization import dumps, loads, prepare_accept_content

from pgbroker.database import queries
from pgbroker.durable.config import connection, missing_table, pool_for, run_pooled
from pgbroker.durable.runs import current_run, describe
from pgbroker.errors import (
    ConfigurationError,
    LeaseLost,
    NonDeterministicWorkflow,
    StepOutputError,
)
from pgbroker.logs import recovery

if TYPE_CHECKING:
    from pgbroker.durable.task import DurableTask

logger = logging.getLogger("pgbroker.durable")


@dataclasses.dataclass
class Step:
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
CONTROL = (Retry, Ignore, Reject, SoftTimeLimitExceeded, NonDeterministicWorkflow)


class _AlreadyRecorded(Exception):
    """Another run committed this step first (rolls back ours)."""


def next_index(request: Any) -> int:
    """The index of the run's next step (or wait)."""
    # Numbered per run: a new request (retry, redelivery) starts at 0.
    index: int = getattr(request, "durable_step_index", 0)
    request.durable_step_index = index + 1
    return index


def run_step(
    task: DurableTask,
    name: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    conn: psycopg.Connection | None,
    retries: int,
    backoff: float,
    max_backoff: float,
    retry_on: type[BaseException] | tuple[type[BaseException], ...],
) -> Any:
    """``task.step(name, fn, *args, **kwargs)`` (see :mod:`pgbroker.durable`)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"step(): the name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"step({name!r}): {fn!r} is not callable")
    if conn is not None and not isinstance(conn, psycopg.Connection):
        raise TypeError(
            f"step({name!r}): conn must be a psycopg 3 (sync) Connection, got {type(conn).__name__}"
        )
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"step({name!r}): retries must be an integer >= 0")
    if backoff < 0 or max_backoff < 0:
        raise ValueError(f"step({name!r}): backoff and max_backoff must be >= 0")
    request = task.request
    step = Step(
        task=task,
        task_id=request.id,
        index=next_index(request),
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
        value, _, _ = _attempts(step, _in_transaction(step, conn))
        return value
    if conn is None:
        return _step_pooled(step)
    return _step_in_transaction(step, conn)


# --- running a step -----------------------------------------------------------------


def execute(step: Step, query: Any, params: dict[str, Any]) -> Any:
    """One statement for ``step``, and its first row: on the run's own
    connection (which holds the task's lock, so a checkpoint written
    there is fenced: it fails if the lock's session is gone), else on a
    pooled one."""
    run = current_run(step.task, step.task_id)
    if run is not None:
        return _first_row(run.execute(query, params))
    return run_pooled(step.task.durable_config, lambda c: _first_row(c.execute(query, params)))


def _step_pooled(step: Step) -> Any:
    config = step.task.durable_config
    q = queries.for_schema(config.schema, "durable.sql")
    key = {"task_id": step.task_id, "step_index": step.index}
    row = execute(step, q["get_step"], key)
    if row is not None and row[1] == "done":
        return replay(step, row)
    value, attempts, error = _attempts(step)
    try:
        payload = encode(step, value)
    except StepOutputError as exc:
        _record_failure(step, attempts, describe(exc))
        raise
    params = record_params(step, payload, attempts, error)
    stored = execute(step, q["record_done"], params)
    if stored is None:
        # Another run of this task recorded the step first: use its
        # output, so that every run goes on with the same value.
        row = execute(step, q["get_step"], key)
        assert row is not None and row[1] == "done"
        return replay(step, row)
    logger.debug("%s done after %d attempt(s)", step.where, attempts)
    return decode(step.task, payload)


def _step_in_transaction(step: Step, conn: psycopg.Connection) -> Any:
    config = step.task.durable_config
    pool_for(config)  # the schema exists (migrated by a connection of ours)
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
        return replay(step, row)

    run = current_run(step.task, step.task_id)
    fence = {"task_id": step.task_id, "run_id": run.run_id if run else None}

    def run_and_record(attempt: int, error: str | None) -> tuple[bytes, str, str]:
        # One attempt: the function's work and the checkpoint, together.
        with conn.transaction():
            if run is not None and conn.execute(q["check_fence"], fence).fetchone() is None:
                # Another run took the task over: neither our work nor
                # our checkpoint may commit.
                raise run.lost()
            value = step.fn(*step.args, **step.kwargs)
            payload = encode(step, value)
            params = record_params(step, payload, attempt, error)
            if conn.execute(q["record_done"], params).fetchone() is None:
                raise _AlreadyRecorded
        return payload

    try:
        payload, _, _ = _attempts(step, run_and_record)
    except _AlreadyRecorded:
        row = execute(step, q["get_step"], key)
        assert row is not None and row[1] == "done"
        logger.info(
            "%s: another run of the task recorded it first",
            step.where,
            extra=recovery("step_recorded_elsewhere", task_id=step.task_id, step=step.name),
        )
        return replay(step, row)
    return decode(step.task, payload)


def _attempts(
    step: Step, attempt: Callable[[int, str | None], Any] | None = None
) -> tuple[Any, int, str | None]:
    """Call the step until it returns or its retries are spent; return
    (value, attempts made, last error or None). ``attempt`` (default: call
    the function) gets the attempt's number and the previous error."""
    call = attempt or (lambda number, error: step.fn(*step.args, **step.kwargs))
    error: str | None = None
    for number in range(1, step.retries + 2):
        try:
            return call(number, error), number, error
        except (*CONTROL, _AlreadyRecorded, LeaseLost):
            raise
        except Exception as exc:
            error = describe(exc)
            # An output the serializer refuses would be refused again.
            retriable = isinstance(exc, step.retry_on) and not isinstance(exc, StepOutputError)
            if not retriable or number > step.retries:
                _record_failure(step, number, error)
                raise
            delay = min(step.backoff * 2 ** (number - 1), step.max_backoff)
            logger.warning(
                "%s failed (attempt %d of %d): %s; retrying in %.2f s",
                step.where,
                number,
                step.retries + 1,
                error,
                delay,
                extra=recovery(
                    "step_retry", task_id=step.task_id, step=step.name, count=number, reason=error
                ),
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def _record_failure(step: Step, attempts: int, error: str) -> None:
    if not step.task_id:
        return
    config = step.task.durable_config
    q = queries.for_schema(config.schema, "durable.sql")
    params = {
        "task_id": step.task_id,
        "step_index": step.index,
        "name": step.name,
        "task_name": step.task.name,
        "attempts": attempts,
        "error": error,
    }
    try:
        execute(step, q["record_failed"], params)
    except Exception as exc:  # the step's own exception matters more
        logger.warning("%s: could not record the failure: %s", step.where, exc)


def replay(step: Step, row: tuple[Any, ...]) -> Any:
    """The recorded output of ``step`` (a row of get_step), decoded."""
    recorded_name, _, output, content_type, content_encoding = row
    if recorded_name != step.name:
        raise NonDeterministicWorkflow(
            f"task {step.task.name}[{step.task_id}]: step {step.index} is {step.name!r} in this "
            f"run, but an earlier run recorded step {step.index} as {recorded_name!r}. "
            "A durable task must call the same steps in the same order on every run "
            "(do not branch on time, randomness or outside state except through step "
            "outputs); to change a task's steps, give the new version another task name"
        )
    logger.info(
        "%s replayed from its checkpoint",
        step.where,
        extra=recovery("replay", task_id=step.task_id, step=step.name),
    )
    return load(step.task, output, content_type, content_encoding)


def record_params(
    step: Step, payload: tuple[bytes, str, str], attempts: int, error: str | None
) -> dict[str, Any]:
    output, content_type, content_encoding = payload
    return {
        "task_id": step.task_id,
        "step_index": step.index,
        "name": step.name,
        "task_name": step.task.name,
        "output": output,
        "content_type": content_type,
        "content_encoding": content_encoding,
        "attempts": attempts,
        "error": error,
    }


def _first_row(cur: psycopg.Cursor[Any]) -> Any:
    return cur.fetchone() if cur.description else None


def _in_transaction(
    step: Step, conn: psycopg.Connection | None
) -> Callable[[int, str | None], Any] | None:
    if conn is None:
        return None

    def attempt(number: int, error: str | None) -> Any:
        with conn.transaction():
            return step.fn(*step.args, **step.kwargs)

    return attempt


# --- outputs ------------------------------------------------------------------------


def encode(step: Step, value: Any) -> tuple[bytes, str, str]:
    """(payload, content type, content encoding) of a step's output, with the
    app's result serializer; :class:`StepOutputError` if it refuses it."""
    serializer = step.task.app.conf.result_serializer
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


def decode(task: DurableTask, payload: tuple[bytes, str, str]) -> Any:
    return load(task, *payload)


def load(task: DurableTask, data: bytes | None, content_type: str, content_encoding: str) -> Any:
    conf = task.app.conf
    accept = prepare_accept_content(conf.result_accept_content or conf.accept_content)
    return loads(
        bytes(data or b""),
        content_type=content_type,
        content_encoding=content_encoding,
        accept=accept,
    )


# --- inspection ---------------------------------------------------------------------


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


def recorded_steps(
    conn_or_url: psycopg.Connection | str,
    task_id: str,
    *,
    schema: str = "pgbroker",
    accept: Any = ("json",),
) -> list[StepRecord]:
    """The recorded steps of one task, in order, outputs decoded."""
    q = queries.for_schema(schema, "durable.sql")
    with connection(conn_or_url) as conn:
        try:
            rows = conn.execute(q["task_steps"], {"task_id": task_id}).fetchall()
        except psycopg.errors.UndefinedTable:
            raise missing_table(schema) from None
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
