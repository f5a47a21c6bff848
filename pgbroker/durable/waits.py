"""Durable waits and events: ``wait_for_event``, ``sleep``, :func:`send_event`.

A wait is recorded like a step (``event:<name>`` or ``sleep:<name>``, its
output the payload or the timeout), so a replay gives the same outcome. A
wait that cannot return at once parks: it records itself in
``durable_wait`` and ends the run with a Celery retry due at the deadline
(a delayed message in pgbroker), counted in the ``pgbroker_parks`` header
rather than against ``max_retries``. :func:`send_event` records an event and
makes its waiters' messages ready; :func:`waiting` lists the parked tasks.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg
from celery.exceptions import Retry
from kombu.serialization import dumps

from pgbroker.database import queries
from pgbroker.durable.config import (
    DurableConfig,
    connection,
    missing_table,
    run_pooled,
    seconds,
)
from pgbroker.durable.runs import Run, current_run, lock_name
from pgbroker.durable.steps import (
    Step,
    decode,
    encode,
    load,
    next_index,
    record_params,
    replay,
)
from pgbroker.errors import DurableWaitError, EventTimeout, StepOutputError

if TYPE_CHECKING:
    from pgbroker.durable.task import DurableTask

logger = logging.getLogger("pgbroker.durable")

#: Longest single park of a waiting task; a longer wait parks again.
PARK_MAX = 86400.0
#: Message header counting a task's parks (waits), which do not count
#: against its max_retries.
PARKS_HEADER = "pgbroker_parks"


def parks_of(task: DurableTask) -> int:
    """How many times the task's current request was parked."""
    try:
        return max(0, int(task.request.get(PARKS_HEADER) or 0))
    except (TypeError, ValueError):
        return 0


# --- waiting in a task --------------------------------------------------------------


def wait_event(task: DurableTask, name: str, timeout: float | timedelta | None) -> Any:
    """``task.wait_for_event(name, timeout)``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"wait_for_event(): the name must be a non-empty string, got {name!r}")
    limit = None if timeout is None else seconds("wait_for_event timeout", timeout)
    return _wait(task, "event", name, limit)


def wait_sleep(task: DurableTask, name: str, duration: float | timedelta) -> None:
    """``task.sleep(name, duration)``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"sleep(): the name must be a non-empty string, got {name!r}")
    _wait(task, "sleep", name, seconds("sleep seconds", duration))


def _wait(task: DurableTask, kind: str, name: str, limit: float | None) -> Any:
    request = task.request
    task_id = request.id
    run = current_run(task, task_id) if task_id else None
    what = f"wait_for_event({name!r})" if kind == "event" else f"sleep({name!r})"
    if run is None:
        raise DurableWaitError(
            f"{what} needs a task run by a worker (or apply()), not a direct call"
        )
    index = next_index(request)
    step = Step(task, task_id, index, f"{kind}:{name}", _no_fn, (), {}, 0, 0.0, 0.0, ())
    config = task.durable_config
    q = queries.for_schema(config.schema, "durable.sql")
    key = {"task_id": task_id, "step_index": index}
    row = run.execute(q["get_step"], key).fetchone()
    if row is not None and row[1] == "done":
        return _outcome(step, replay(step, row), limit)
    params = {**key, "task_name": task.name, "kind": kind, "name": name, "seconds": limit}
    found = run.execute(q["begin_wait"], params).fetchone()
    assert found is not None
    arrived, data, content_type, content_encoding, due, left = found
    if arrived:
        outcome: dict[str, Any] = {"payload": load(task, data, content_type, content_encoding)}
    elif due:
        outcome = {"timeout": True} if kind == "event" else {}
    else:
        park = PARK_MAX if left is None else min(max(float(left), 0.0), PARK_MAX)
        reason = f"waiting for event {name!r}" if kind == "event" else f"sleeping ({name!r})"
        raise _park(task, run, park, reason, name if kind == "event" else None)
    payload = encode(step, outcome)
    with run.conn.transaction():
        stored = run.execute(q["record_done"], record_params(step, payload, 1, None)).fetchone()
        run.execute(q["end_wait"], key)
    if stored is None:  # cannot happen while we hold the lock; be safe
        row = run.execute(q["get_step"], key).fetchone()
        assert row is not None
        return _outcome(step, replay(step, row), limit)
    return _outcome(step, decode(task, payload), limit)


def _outcome(step: Step, outcome: Any, limit: float | None) -> Any:
    if isinstance(outcome, dict) and outcome.get("timeout"):
        raise EventTimeout(
            f"{step.where}: no event {step.name.partition(':')[2]!r} within the timeout "
            f"({limit} s); send_event() it earlier, or catch EventTimeout"
        )
    if isinstance(outcome, dict):
        return outcome.get("payload")
    return None


def _park(task: DurableTask, run: Run, delay: float, reason: str, event: str | None) -> Retry:
    """End this run without holding a worker: publish the task again,
    due in ``delay`` seconds (a delayed message in pgbroker), not counted as
    a retry. Returns the Retry to raise."""
    request = task.request
    if request.is_eager:
        raise DurableWaitError(
            f"task {task.name}[{run.task_id}]: {reason}, but an eager task (apply(), "
            "task_always_eager) cannot park; run it on a worker"
        )
    headers = {**(request.headers or {}), PARKS_HEADER: parks_of(task) + 1}
    sig = task.signature_from_request(
        request, countdown=delay, retries=request.retries + 1, headers=headers
    )
    sig.apply_async()
    if event is not None:
        _wake_self_if_sent(task, run, event)
    logger.info("task %s[%s]: %s; parked for up to %.0f s", task.name, run.task_id, reason, delay)
    return Retry(f"{reason} (parked, not holding a worker)", when=delay, sig=sig)


def _wake_self_if_sent(task: DurableTask, run: Run, event: str) -> None:
    # send_event may have looked for our delayed message before it was
    # committed: under the event's lock, one of us sees the other.
    config = task.durable_config
    q = queries.for_schema(config.schema, "durable.sql")
    with run.conn.transaction():
        run.execute(q["event_lock"], {"lock": lock_name(config.schema, "event", event)})
        run.execute(
            q["wake_self"], {"task_id": run.task_id, "name": event, "channel": config.schema}
        )


def _no_fn() -> None:
    """The function of a wait's step record (never called)."""


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
        "lock": lock_name(schema_name, "event", name),
        "channel": schema_name,
    }

    def send(conn: psycopg.Connection) -> SentEvent:
        try:
            with conn.transaction():
                # The lock orders us with a task parking on this event (see
                # _wake_self_if_sent).
                conn.execute(q["event_lock"], params)
                recorded = conn.execute(q["record_event"], params).fetchone() is not None
                row = conn.execute(q["wake_waiters"], params).fetchone()
        except psycopg.errors.UndefinedTable:
            raise missing_table(schema_name) from None
        assert row is not None
        woken = list(row[1] or [])
        logger.info("event %r sent: %d task(s) waiting, %d woken", name, int(row[0]), len(woken))
        return SentEvent(recorded, int(row[0]), woken)

    if isinstance(target, DurableConfig):
        return run_pooled(target, send)
    with connection(target) as conn:
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
    with connection(conn_or_url) as conn:
        try:
            rows = conn.execute(q["waits"]).fetchall()
        except psycopg.errors.UndefinedTable:
            raise missing_table(schema) from None
    return [WaitRecord(*row) for row in rows]
