"""Operator actions on a pgbroker schema, as plain functions.

The ``pgbroker`` command's ``status``, ``top``, ``purge``, ``dead-letters``
and ``tasks`` subcommands call these; code can too::

    from pgbroker.operations import admin

    with admin.open_connection("postgresql://app@db/app", "pgbroker") as conn:
        for queue in admin.status(conn, "pgbroker").queues:
            print(queue.name, queue.ready)
        admin.replay_dead_letters(conn, "pgbroker", [17, 18])

Each function takes an autocommit connection and the schema name and
returns dataclasses. The queries are in ``sql/admin.sql``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
from kombu.serialization import loads

from pgbroker.database import queries
from pgbroker.database import schema as schema_mod
from pgbroker.database.sessions import connect
from pgbroker.errors import NotFound, SchemaError

#: Seconds to wait for the server before giving up.
CONNECT_TIMEOUT = 10

#: Dead letters moved or dropped per statement (and per progress report).
BATCH_SIZE = 500

# Serializers whose decoding runs no code: results and arguments in another
# format (pickle) are shown as their size, never unpickled by an admin tool.
_SAFE_CONTENT_TYPES = frozenset({"application/json", "application/x-msgpack"})


# --- connecting ------------------------------------------------------------------


def open_connection(
    url: str, schema: str, *, connect_timeout: float = CONNECT_TIMEOUT
) -> psycopg.Connection:
    """An autocommit connection to ``url``; raise SchemaError if ``schema``
    holds no pgbroker tables."""
    conn = connect(url, connect_timeout=connect_timeout)
    try:
        if schema_mod.current_version(conn, schema) is None:
            raise SchemaError(
                f"database {conn.info.dbname!r} has no pgbroker schema {schema!r}: pass the "
                "--schema the application uses (transport option 'schema'), or create it "
                "with `pgbroker migrate`"
            )
    except BaseException:
        conn.close()
        raise
    return conn


def where(conn: psycopg.Connection) -> str:
    """``user@host:port/database``, never the password."""
    info = conn.info
    return f"{info.user}@{info.host}:{info.port}/{info.dbname}"


def _q(schema: str, name: str) -> Any:
    return queries.for_schema(schema, "admin.sql")[name]


# --- status ----------------------------------------------------------------------


@dataclasses.dataclass
class QueueStats:
    #: None for dead letters that never reached a queue (unroutable).
    name: str | None
    ready: int
    reserved: int
    delayed: int
    dead_lettered: int
    #: Seconds since the oldest ready message was published; None if none.
    oldest_ready_age: float | None
    consumers: int
    #: False for a name that has messages or dead letters but no queue row.
    declared: bool


@dataclasses.dataclass
class ConsumerInfo:
    id: int
    hostname: str
    pid: int
    backend_pid: int
    started_at: datetime
    #: Its session still holds its advisory lock. A dead consumer's row and
    #: reserved messages stay until a live consumer's next sweep.
    alive: bool
    queues: list[str]
    reserved: int


@dataclasses.dataclass
class ResultActivity:
    """Results stored with a completion time (task_result.date_done)."""

    last_minute: int
    last_5_minutes: int
    last_hour: int
    by_state_last_hour: dict[str, int]


@dataclasses.dataclass
class Activity:
    redeliveries_last_hour: int
    redeliveries_by_reason: dict[str, int]
    dead_lettered_last_hour: int
    #: Messages ever stored (the message id sequence; one per queue a
    #: message was routed to), None before the first. Two samples give the
    #: publish rate; `pgbroker top` shows it.
    messages_stored_total: int | None
    #: Rows in the message table now, all queues, every state.
    messages_present: int
    #: None when the schema has no task_result table.
    results: ResultActivity | None


@dataclasses.dataclass
class Status:
    schema: str
    database: str
    at: datetime
    queues: list[QueueStats]
    #: Celery's own broadcast queues (pidbox, celeryev.*), left out unless
    #: asked for.
    hidden_queues: int
    consumers: list[ConsumerInfo]
    activity: Activity


def is_internal_queue(name: str | None) -> bool:
    """Celery's remote-control and event queues, one or more per process."""
    return name is not None and (name.endswith(".pidbox") or name.startswith("celeryev."))


def queue_stats(conn: psycopg.Connection, schema: str) -> list[QueueStats]:
    """Every queue's counts (read from the ``queue_stats`` view), Celery's
    broadcast queues included."""
    return [
        QueueStats(
            name=r[0],
            ready=r[1],
            reserved=r[2],
            delayed=r[3],
            dead_lettered=r[4],
            oldest_ready_age=r[5],
            consumers=r[6],
            declared=r[7],
        )
        for r in conn.execute(_q(schema, "queue_stats")).fetchall()
    ]


def status(conn: psycopg.Connection, schema: str, *, all_queues: bool = False) -> Status:
    """Queues, consumers and recent activity of one schema."""
    queues = queue_stats(conn, schema)
    shown = queues if all_queues else [q for q in queues if not is_internal_queue(q.name)]
    consumers = [
        ConsumerInfo(
            id=r[0],
            hostname=r[1],
            pid=r[2],
            backend_pid=r[3],
            started_at=r[4],
            alive=r[5],
            queues=list(r[6]),
            reserved=r[7],
        )
        for r in conn.execute(_q(schema, "consumers")).fetchall()
    ]
    row = conn.execute(_q(schema, "broker_activity"), {"schema": schema}).fetchone()
    assert row is not None
    activity = Activity(
        redeliveries_last_hour=row[0],
        redeliveries_by_reason=dict(row[1]),
        dead_lettered_last_hour=row[2],
        messages_stored_total=row[3],
        messages_present=row[4],
        results=_result_activity(conn, schema),
    )
    return Status(
        schema=schema,
        database=where(conn),
        at=datetime.now(timezone.utc),
        queues=shown,
        hidden_queues=len(queues) - len(shown),
        consumers=consumers,
        activity=activity,
    )


def _has_results(conn: psycopg.Connection, schema: str) -> bool:
    row = conn.execute(_q(schema, "result_tables_exist"), {"schema": schema}).fetchone()
    return bool(row and row[0])


def _result_activity(conn: psycopg.Connection, schema: str) -> ResultActivity | None:
    if not _has_results(conn, schema):
        return None
    rows = conn.execute(_q(schema, "result_activity")).fetchall()
    return ResultActivity(
        last_minute=sum(r[1] for r in rows),
        last_5_minutes=sum(r[2] for r in rows),
        last_hour=sum(r[3] for r in rows),
        by_state_last_hour={r[0]: r[3] for r in rows},
    )


# --- purge -----------------------------------------------------------------------


def ready_count(conn: psycopg.Connection, schema: str, queue: str) -> int:
    """Ready messages in ``queue``; NotFound if there is no such queue."""
    row = conn.execute(_q(schema, "count_ready"), {"queue": queue}).fetchone()
    count = int(row[0]) if row else 0
    if count == 0:
        declared = conn.execute(_q(schema, "queue_declared"), {"queue": queue}).fetchone()
        if not (declared and declared[0]):
            raise NotFound(f"no queue named {queue!r} in schema {schema!r}")
    return count


def purge(conn: psycopg.Connection, schema: str, queue: str) -> int:
    """Delete the ready messages of ``queue``; return how many.

    Reserved messages (a consumer is working on them) and delayed ones stay.
    """
    ready_count(conn, schema, queue)  # NotFound for an unknown queue
    return conn.execute(_q(schema, "purge_ready"), {"queue": queue}).rowcount


# --- dead letters ----------------------------------------------------------------


@dataclasses.dataclass
class DeadLetter:
    id: int
    died_at: datetime
    reason: str
    queue: str | None
    delivery_count: int
    exchange: str
    routing_key: str
    task_id: str | None
    task_name: str | None
    priority: int
    published_at: datetime
    body_size: int


@dataclasses.dataclass
class DeadLetterPage:
    #: Dead letters matching the filters, newest first, at most `limit`.
    items: list[DeadLetter]
    #: How many match in all.
    total: int


def list_dead_letters(
    conn: psycopg.Connection,
    schema: str,
    *,
    queue: str | None = None,
    reason: str | None = None,
    limit: int = 50,
) -> DeadLetterPage:
    rows = conn.execute(
        _q(schema, "list_dead_letters"), {"queue": queue, "reason": reason, "limit": limit}
    ).fetchall()
    items = [DeadLetter(*r[:12]) for r in rows]
    total = rows[0][12] if rows else count_dead_letters(conn, schema, queue=queue, reason=reason)
    return DeadLetterPage(items=items, total=total)


def count_dead_letters(
    conn: psycopg.Connection,
    schema: str,
    ids: Sequence[int] | None = None,
    *,
    queue: str | None = None,
    reason: str | None = None,
) -> int:
    """Dead letters among ``ids`` (all when None) matching the filters."""
    row = conn.execute(
        _q(schema, "count_dead_letters"),
        {"ids": None if ids is None else list(ids), "queue": queue, "reason": reason},
    ).fetchone()
    return int(row[0]) if row else 0


@dataclasses.dataclass
class Kept:
    """A dead letter a replay left where it was, and why."""

    id: int
    why: str


@dataclasses.dataclass
class ReplayResult:
    #: Dead letters moved back.
    replayed: int = 0
    #: Messages stored per queue (a dead letter routed again through a
    #: fanout or topic exchange may go to several).
    messages: dict[str, int] = dataclasses.field(default_factory=dict)
    kept: list[Kept] = dataclasses.field(default_factory=list)
    #: Requested ids that are not dead letters (or do not match the filters).
    not_found: list[int] = dataclasses.field(default_factory=list)


#: progress(done, total): called after each batch.
Progress = Callable[[int, int], None]


def replay_dead_letters(
    conn: psycopg.Connection,
    schema: str,
    ids: Sequence[int] | None = None,
    *,
    queue: str | None = None,
    reason: str | None = None,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
) -> ReplayResult:
    """Put dead letters back on their queues, intact.

    ``ids`` None means every dead letter matching ``queue`` and ``reason``.
    Each message gets its body, headers, properties and priority back as
    they were, as a new ready message at the end of its queue; it leaves
    dead_letter in the same statement, and the queue's consumers are woken
    by NOTIFY. A dead letter whose queue no longer exists stays (see
    ``kept``); one that was unroutable is routed again by its exchange and
    routing key, and stays if it still matches no queue.
    """
    result = ReplayResult()

    def replay(batch: list[int]) -> None:
        row = conn.execute(
            _q(schema, "replay_dead_letters"), {"ids": batch, "channel": schema}
        ).fetchone()
        assert row is not None
        result.replayed += row[0]
        for name, n in row[1].items():
            result.messages[name] = result.messages.get(name, 0) + n
        if row[0] < len(batch):
            left = conn.execute(_q(schema, "dead_letters_left"), {"ids": batch}).fetchall()
            result.kept.extend(Kept(r[0], _why_kept(r[1], r[2], r[3])) for r in left)

    result.not_found = _in_batches(conn, schema, ids, queue, reason, batch_size, replay, progress)
    return result


def _why_kept(queue: str | None, exchange: str, routing_key: str) -> str:
    if queue is not None:
        return f"its queue {queue!r} no longer exists (declare it, then replay again)"
    if exchange == "":
        return f"unroutable: no queue named {routing_key!r} (default exchange)"
    return f"unroutable: no queue is bound to exchange {exchange!r} for key {routing_key!r}"


@dataclasses.dataclass
class DropResult:
    dropped: int = 0
    not_found: list[int] = dataclasses.field(default_factory=list)


def drop_dead_letters(
    conn: psycopg.Connection,
    schema: str,
    ids: Sequence[int] | None = None,
    *,
    queue: str | None = None,
    reason: str | None = None,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
) -> DropResult:
    """Delete dead letters for good; ``ids`` None means all matching the filters."""
    result = DropResult()

    def drop(batch: list[int]) -> None:
        result.dropped += conn.execute(_q(schema, "drop_dead_letters"), {"ids": batch}).rowcount

    result.not_found = _in_batches(conn, schema, ids, queue, reason, batch_size, drop, progress)
    return result


def _in_batches(
    conn: psycopg.Connection,
    schema: str,
    ids: Sequence[int] | None,
    queue: str | None,
    reason: str | None,
    batch_size: int,
    action: Callable[[list[int]], None],
    progress: Progress | None,
) -> list[int]:
    """Run ``action`` on the matching dead letters, ``batch_size`` ids at a
    time in id order; return the requested ids that matched none."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    wanted = None if ids is None else sorted(set(ids))
    if wanted == []:
        return []
    total = count_dead_letters(conn, schema, wanted, queue=queue, reason=reason)
    seen: set[int] = set()
    after = 0
    done = 0
    while True:
        params = {
            "after": after,
            "ids": wanted,
            "queue": queue,
            "reason": reason,
            "limit": batch_size,
        }
        batch = [r[0] for r in conn.execute(_q(schema, "select_dead_letters"), params)]
        if not batch:
            break
        after = batch[-1]
        seen.update(batch)
        action(batch)
        done += len(batch)
        if progress is not None:
            progress(done, max(total, done))
    return [i for i in (wanted or []) if i not in seen]


# --- tasks -----------------------------------------------------------------------


@dataclasses.dataclass
class TaskSummary:
    task_id: str
    #: NULL unless the app sets result_extended=True.
    name: str | None
    state: str
    worker: str | None
    queue: str | None
    retries: int | None
    created_at: datetime
    updated_at: datetime
    date_done: datetime | None


@dataclasses.dataclass
class TaskPage:
    items: list[TaskSummary]
    total: int


def list_tasks(
    conn: psycopg.Connection,
    schema: str,
    *,
    name: str | None = None,
    state: str | None = None,
    since: timedelta | None = None,
    limit: int = 50,
) -> TaskPage:
    """Stored task results, most recently changed first.

    ``name`` may use ``*`` as a wildcard (``"billing.*"``); ``state`` is a
    Celery state (case does not matter); ``since`` keeps tasks whose row
    changed within that long.
    """
    _require_results(conn, schema)
    params = {
        "name": None if name is None else _like(name),
        "state": None if state is None else state.upper(),
        "since": since,
        "limit": limit,
    }
    rows = conn.execute(_q(schema, "list_tasks"), params).fetchall()
    return TaskPage(items=[TaskSummary(*r[:9]) for r in rows], total=rows[0][9] if rows else 0)


def _like(pattern: str) -> str:
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%")


def _require_results(conn: psycopg.Connection, schema: str) -> None:
    if not _has_results(conn, schema):
        raise SchemaError(
            f"schema {schema!r} has no task_result table (it predates the result "
            "backend): run `pgbroker migrate`"
        )


@dataclasses.dataclass
class TaskResult:
    task_id: str
    state: str
    name: str | None
    worker: str | None
    queue: str | None
    retries: int | None
    parent_id: str | None
    root_id: str | None
    group_id: str | None
    #: Decoded values (see decode()).
    result: Any
    traceback: str | None
    args: Any
    kwargs: Any
    children: Any
    extra: Any
    content_type: str
    date_done: datetime | None
    created_at: datetime
    updated_at: datetime
    #: Of the run that stored the latest state (017_history.sql): when its
    #: message was claimed (server clock) and its body started (worker
    #: clock); None when unknown.
    received_at: datetime | None = None
    started_at: datetime | None = None
    #: One per RETRY stored, oldest first (the last 50).
    retry_log: list[RetryRecord] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RetryRecord:
    """A RETRY state stored (task_result.retry_log, 017_history.sql)."""

    at: datetime | None
    #: The exception's type and message.
    reason: str | None
    #: That run's times, as received_at and started_at.
    received_at: datetime | None
    started_at: datetime | None

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> RetryRecord:
        def when(key: str) -> datetime | None:
            at = entry.get(key)  # Unix seconds
            if not isinstance(at, (int, float)):
                return None
            return datetime.fromtimestamp(at, timezone.utc)

        return cls(when("at"), entry.get("reason"), when("received_at"), when("started_at"))


@dataclasses.dataclass
class TaskMessage:
    id: int
    queue: str
    state: str
    priority: int
    delivery_count: int
    consumer_id: int | None
    published_at: datetime
    claimed_at: datetime | None
    visible_at: datetime | None
    expires_at: datetime | None
    exchange: str
    routing_key: str
    headers: dict[str, Any]


@dataclasses.dataclass
class TaskDeadLetter:
    id: int
    reason: str
    died_at: datetime
    queue: str | None
    delivery_count: int
    exchange: str
    routing_key: str
    published_at: datetime


@dataclasses.dataclass
class TaskRedelivery:
    at: datetime
    reason: str
    message_id: int
    queue: str
    consumer_id: int | None
    delivery_count: int


@dataclasses.dataclass
class TaskDetail:
    task_id: str
    #: None while no result is stored (PENDING, or another result backend).
    result: TaskResult | None
    messages: list[TaskMessage]
    dead_letters: list[TaskDeadLetter]
    redeliveries: list[TaskRedelivery]


def show_task(conn: psycopg.Connection, schema: str, task_id: str) -> TaskDetail:
    """Everything pgbroker holds about one task; NotFound if nothing."""
    params = {"task_id": task_id}
    result = None
    if _has_results(conn, schema):
        row = conn.execute(_q(schema, "task_result"), params).fetchone()
        if row is not None:
            result = _task_result(row)
    detail = TaskDetail(
        task_id=task_id,
        result=result,
        messages=[TaskMessage(*r) for r in conn.execute(_q(schema, "task_messages"), params)],
        dead_letters=[
            TaskDeadLetter(*r) for r in conn.execute(_q(schema, "task_dead_letters"), params)
        ],
        redeliveries=[
            TaskRedelivery(*r) for r in conn.execute(_q(schema, "task_redeliveries"), params)
        ],
    )
    if not (detail.result or detail.messages or detail.dead_letters or detail.redeliveries):
        raise NotFound(
            f"no task {task_id!r} in schema {schema!r}: no stored result, message, "
            "dead letter or redelivery has that id"
        )
    return detail


def _task_result(row: tuple[Any, ...]) -> TaskResult:
    (
        task_id,
        state,
        name,
        worker,
        queue,
        retries,
        parent_id,
        root_id,
        group_id,
        result,
        content_type,
        content_encoding,
        traceback,
        args,
        kwargs,
        children,
        extra,
        date_done,
        created_at,
        updated_at,
        received_at,
        started_at,
        retry_log,
    ) = row

    def load(data: bytes | None) -> Any:
        return decode(data, content_type, content_encoding)

    return TaskResult(
        task_id=task_id,
        state=state,
        name=name,
        worker=worker,
        queue=queue,
        retries=retries,
        parent_id=parent_id,
        root_id=root_id,
        group_id=group_id,
        result=load(result),
        traceback=traceback,
        args=load(args),
        kwargs=load(kwargs),
        children=load(children),
        extra=load(extra),
        content_type=content_type,
        date_done=date_done,
        created_at=created_at,
        updated_at=updated_at,
        received_at=received_at,
        started_at=started_at,
        retry_log=[RetryRecord.from_json(e) for e in retry_log or []],
    )


def decode(data: bytes | None, content_type: str, content_encoding: str) -> Any:
    """A stored value decoded, if its serializer is safe to decode
    (JSON, msgpack); otherwise a short description of it."""
    if data is None:
        return None
    raw = bytes(data)
    if content_type not in _SAFE_CONTENT_TYPES:
        return f"<{len(raw)} bytes of {content_type}, not decoded>"
    try:
        return loads(
            raw,
            content_type=content_type,
            content_encoding=content_encoding,
            accept=_SAFE_CONTENT_TYPES,
        )
    except Exception as exc:
        return f"<{len(raw)} bytes of {content_type}, undecodable: {exc}>"


# --- durations -------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> timedelta:
    """``"90s"``, ``"15m"``, ``"1h30m"``, ``"2d"``, ``"1w"`` as a timedelta."""
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ValueError(
            f"invalid duration {text!r}: use a number and a unit, s m h d or w "
            "(e.g. 90s, 15m, 1h30m, 2d)"
        )
    return timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in parts))
