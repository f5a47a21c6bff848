"""What the dashboard's pages read, as plain functions over a connection.

Queue counts, consumers, one task's record and dead letters come from
:mod:`pgbroker.operations.admin` (the queries behind the CLI); what only the
dashboard asks (task search with keyset paging, the last hour per minute,
the sweeper, a task's canvas and durable state) is in ``sql/dashboard.sql``.
Every function takes an autocommit connection and the schema name; none
writes.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

import psycopg

from pgbroker.database import queries
from pgbroker.operations import admin, beat

#: Rows per page of the Tasks page.
PAGE_SIZE = 50
#: Tasks drawn in one task's canvas at most.
CANVAS_LIMIT = 200


def _q(schema: str, name: str) -> Any:
    return queries.for_schema(schema, "dashboard.sql")[name]


def _run(conn: psycopg.Connection, schema: str, name: str, params: dict[str, Any]) -> Any:
    # Unprepared: planned with the values given, so an empty filter drops out
    # of the plan (see the head of sql/dashboard.sql).
    return conn.execute(_q(schema, name), params, prepare=False)


# --- task search -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskFilter:
    """The Tasks page's filters; None (or "") means any."""

    task_id: str | None = None
    #: Exact, or with ``*`` as a wildcard (``billing.*``).
    name: str | None = None
    state: str | None = None
    queue: str | None = None
    worker: str | None = None
    #: Last change at or after / before (task_result.updated_at).
    since: datetime | None = None
    until: datetime | None = None

    def params(self) -> dict[str, Any]:
        name = self.name or None
        wildcard = name is not None and "*" in name
        return {
            "task_id": self.task_id or None,
            "name": None if wildcard else name,
            "name_like": admin._like(name) if wildcard and name else None,
            "state": self.state.upper() if self.state else None,
            "queue": self.queue or None,
            "worker": self.worker or None,
            "since": self.since,
            "until": self.until,
        }


@dataclasses.dataclass(frozen=True)
class Position:
    """Where a page starts: after this row of the previous page."""

    updated_at: datetime
    task_id: str

    def encode(self) -> str:
        return f"{self.updated_at.isoformat()}|{self.task_id}"

    @classmethod
    def decode(cls, text: str) -> Position:
        """The inverse of :meth:`encode`; ValueError when malformed."""
        when, sep, task_id = text.partition("|")
        if not sep:
            raise ValueError(f"invalid page position {text!r}")
        at = datetime.fromisoformat(when)
        if at.tzinfo is None:
            raise ValueError(f"invalid page position {text!r}: no time zone")
        return cls(at, task_id)


@dataclasses.dataclass
class TaskSearchPage:
    items: list[admin.TaskSummary]
    #: Where the next page starts; None on the last page.
    next: Position | None


def search_tasks(
    conn: psycopg.Connection,
    schema: str,
    where: TaskFilter,
    *,
    after: Position | None = None,
    limit: int = PAGE_SIZE,
) -> TaskSearchPage:
    """One page of task_result, newest change first (keyset paging)."""
    rows = _run(conn, schema, "search_tasks", search_params(where, after, limit)).fetchall()
    items = [admin.TaskSummary(*r) for r in rows[:limit]]
    more = len(rows) > limit
    last = items[-1] if items else None
    return TaskSearchPage(
        items=items,
        next=Position(last.updated_at, last.task_id) if more and last else None,
    )


def search_params(where: TaskFilter, after: Position | None, limit: int) -> dict[str, Any]:
    """What search_tasks binds (one more row than shown: is there a next
    page?); the plan tests EXPLAIN the statement with these."""
    return {
        **where.params(),
        "after_at": after.updated_at if after else None,
        "after_id": after.task_id if after else None,
        "limit": limit + 1,
    }


@dataclasses.dataclass
class InFlight:
    message_id: int
    task_id: str
    task_name: str | None
    queue: str
    state: str
    delivery_count: int
    published_at: datetime
    claimed_at: datetime | None
    visible_at: datetime | None


def in_flight(
    conn: psycopg.Connection, schema: str, where: TaskFilter, *, limit: int = PAGE_SIZE
) -> list[InFlight]:
    """Messages of tasks not finished yet that match the filters a message
    has (task id, name, queue)."""
    p = where.params()
    params = {k: p[k] for k in ("task_id", "name", "name_like", "queue")}
    return [InFlight(*r) for r in _run(conn, schema, "in_flight", {**params, "limit": limit})]


# --- overview ----------------------------------------------------------------------


@dataclasses.dataclass
class Minute:
    at: datetime
    completed: int
    failed: int
    #: Messages stored (publish_sample, 017_history.sql); None: not known.
    published: int | None = None


def throughput(conn: psycopg.Connection, schema: str) -> list[Minute]:
    """The last hour, per minute, oldest first (60 rows)."""
    return [Minute(*r) for r in _run(conn, schema, "throughput", {})]


@dataclasses.dataclass
class SweeperSession:
    #: "sweeper" or "standby".
    role: str
    #: pgbroker-sweeper:<host>:<pid>, None when the server hides it.
    application_name: str | None
    since: datetime | None


def sweeper(conn: psycopg.Connection, schema: str) -> list[SweeperSession]:
    return [SweeperSession(*r) for r in _run(conn, schema, "sweeper", {})]


# --- one task ----------------------------------------------------------------------


@dataclasses.dataclass
class CanvasNode:
    task_id: str
    name: str | None
    state: str
    parent_id: str | None
    root_id: str | None
    group_id: str | None
    date_done: datetime | None
    children: list[CanvasNode] = dataclasses.field(default_factory=list)


def canvas(conn: psycopg.Connection, schema: str, result: admin.TaskResult) -> list[CanvasNode]:
    """The task's workflow as trees (by parent_id), roots first.

    A task whose parent is not stored (another backend, expired) is a root.
    An empty list when the task is alone.
    """
    me = result.task_id
    # An id no row has stands for a link the task lacks: `= NULL` would keep
    # a constant NULL in the OR and cost the bitmap plan.
    params = {
        "task_id": me,
        "root_id": result.root_id or me,
        "parent_id": result.parent_id or me,
        "group_id": result.group_id or me,
        "limit": CANVAS_LIMIT,
    }
    nodes = [CanvasNode(*r) for r in _run(conn, schema, "canvas", params)]
    if len(nodes) <= 1:
        return []
    by_id = {n.task_id: n for n in nodes}
    roots = []
    for node in nodes:
        parent = by_id.get(node.parent_id) if node.parent_id else None
        if parent is not None and parent is not node:
            parent.children.append(node)
        else:
            roots.append(node)
    return roots


@dataclasses.dataclass
class Step:
    index: int
    name: str
    state: str
    output: Any
    attempts: int
    error: str | None
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None


@dataclasses.dataclass
class Wait:
    step_index: int
    kind: str
    name: str
    since: datetime
    deadline: datetime | None
    woken_at: datetime | None
    #: When the event waited for was sent (kind "event"), if it was.
    event_sent_at: datetime | None


@dataclasses.dataclass
class Run:
    task_id: str
    task_name: str | None
    hostname: str | None
    pid: int | None
    exclusive_key: str | None
    started_at: datetime
    alive: bool


@dataclasses.dataclass
class Durable:
    steps: list[Step]
    waits: list[Wait]
    run: Run | None

    #: The task's name, as its steps or run recorded it.
    task_name: str | None = None

    def __bool__(self) -> bool:
        return bool(self.steps or self.waits or self.run)


def durable(conn: psycopg.Connection, schema: str, task_id: str) -> Durable:
    """A DurableTask's steps (outputs decoded as admin.decode does), waits
    and run; all empty for another task."""
    params = {"task_id": task_id}
    rows = conn.execute(queries.for_schema(schema, "durable.sql")["task_steps"], params).fetchall()
    steps = [
        Step(
            index=r[0],
            name=r[1],
            state=r[3],
            output=admin.decode(r[4], r[5] or "", r[6] or ""),
            attempts=r[7],
            error=r[8],
            created_at=r[9],
            updated_at=r[10],
            expires_at=r[11],
        )
        for r in rows
    ]
    waits = [Wait(*r) for r in _run(conn, schema, "task_waits", params)]
    row = _run(conn, schema, "task_run", params).fetchone()
    run = Run(*row) if row else None
    task_name = run.task_name if run else next((r[2] for r in rows if r[2]), None)
    return Durable(steps=steps, waits=waits, run=run, task_name=task_name)


def durable_runs(conn: psycopg.Connection, schema: str, *, limit: int = 200) -> list[Run]:
    """Durable runs, newest first."""
    return [Run(*r) for r in _run(conn, schema, "durable_runs", {"limit": limit})]


# --- dead letters, redeliveries ----------------------------------------------------


def dead_letter_reasons(conn: psycopg.Connection, schema: str) -> dict[str, int]:
    return dict(_run(conn, schema, "dead_letter_reasons", {}).fetchall())


@dataclasses.dataclass
class DeadLetterDetail:
    item: admin.DeadLetter
    content_type: str | None
    content_encoding: str | None
    headers: str
    properties: str
    #: The body decoded as admin.decode does (JSON and msgpack only).
    body: Any


def dead_letter(conn: psycopg.Connection, schema: str, id: int) -> DeadLetterDetail | None:
    row = _run(conn, schema, "dead_letter", {"id": id}).fetchone()
    if row is None:
        return None
    body = bytes(row[15])
    item = admin.DeadLetter(
        id=row[0],
        died_at=row[1],
        reason=row[2],
        queue=row[3],
        delivery_count=row[4],
        exchange=row[5],
        routing_key=row[6],
        task_id=row[7],
        task_name=row[8],
        priority=row[9],
        published_at=row[10],
        body_size=len(body),
    )
    return DeadLetterDetail(
        item=item,
        content_type=row[11],
        content_encoding=row[12],
        headers=row[13],
        properties=row[14],
        body=admin.decode(body, row[11] or "", row[12] or "utf-8"),
    )


@dataclasses.dataclass
class ReasonCount:
    reason: str
    total: int
    last_day: int
    last_hour: int
    last_at: datetime


@dataclasses.dataclass
class Redelivery:
    at: datetime
    reason: str
    message_id: int
    queue: str
    task_id: str | None
    consumer_id: int | None
    delivery_count: int


def redeliveries(
    conn: psycopg.Connection, schema: str, *, reason: str | None = None, limit: int = 100
) -> tuple[list[ReasonCount], list[Redelivery]]:
    """The recovery log by reason, and its newest rows (of ``reason``)."""
    counts = [ReasonCount(*r) for r in _run(conn, schema, "redeliveries_by_reason", {})]
    recent = [
        Redelivery(*r)
        for r in _run(conn, schema, "recent_redeliveries", {"reason": reason, "limit": limit})
    ]
    return counts, recent


# --- beat --------------------------------------------------------------------------


@dataclasses.dataclass
class BeatRow:
    entry: beat.BeatEntry
    #: The next slot after the last run (in the past: due now, or missed
    #: while no beat ran). Crontabs are read in UTC here: the dashboard does
    #: not know the app's timezone.
    next_run: datetime | None


def beat_entries(conn: psycopg.Connection, schema: str) -> list[BeatRow]:
    """The beat schedule of the schema (beat.sql's load_entries), by name."""
    rows = conn.execute(queries.for_schema(schema, "beat.sql")["load_entries"]).fetchall()
    found = []
    for row in rows:
        entry = beat.BeatEntry.from_row(row)
        try:
            next_run: datetime | None = beat.next_slot(entry.schedule, entry.last_run_at)
        except Exception:  # a schedule Celery cannot evaluate: show the rest
            next_run = None
        found.append(BeatRow(entry, next_run))
    return found
