"""The dashboard's pages: one sync function per route.

Starlette runs sync endpoints in its thread pool, so each page may block
on its queries. A page reads everything it shows through one pooled
connection (``Settings.run``), then renders a template; every value from
task data is escaped by the template, never here.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from typing import Any

import psycopg
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from pgbroker.dashboard import charts, data, values
from pgbroker.dashboard.web import logger, render, safe_message, settings_of
from pgbroker.durable.waits import WaitRecord, waiting
from pgbroker.errors import NotFound
from pgbroker.operations import admin

#: The Celery states offered by the Tasks page's state filter.
STATES = ["RECEIVED", "STARTED", "RETRY", "SUCCESS", "FAILURE", "REVOKED"]

#: The values of a stored result a page can show whole (/task/value).
FIELDS = ("args", "kwargs", "result", "traceback", "children", "extra")


# --- overview ----------------------------------------------------------------------


@dataclasses.dataclass
class Live:
    """The overview's parts that refresh: queues, consumers, sweeper, chart."""

    status: admin.Status
    sweeper: list[data.SweeperSession]
    chart: charts.Chart
    at: datetime


def _live(request: Request) -> Live:
    settings = settings_of(request)

    def read(conn: psycopg.Connection) -> Live:
        return Live(
            status=admin.status(conn, settings.schema),
            sweeper=data.sweeper(conn, settings.schema),
            chart=charts.per_minute(data.throughput(conn, settings.schema)),
            at=datetime.now(timezone.utc),
        )

    return settings.run(read)


def overview(request: Request) -> Response:
    return render(request, "overview.html", page="overview", live=_live(request))


def overview_live(request: Request) -> Response:
    """The overview's live part alone, which htmx fetches every few seconds."""
    return render(request, "_overview_live.html", live=_live(request))


# --- tasks -------------------------------------------------------------------------


def _parse_time(text: str, field: str) -> datetime:
    """An ISO 8601 time from a filter field; UTC when it names no zone
    (what a datetime-local input sends)."""
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{field}: {text!r} is not a time (use 2026-01-31T14:00)") from None
    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)


def _filter(query: Any) -> tuple[data.TaskFilter, list[str]]:
    """The Tasks page's filters from the query string, and what was wrong."""
    errors = []
    times: dict[str, datetime | None] = {"since": None, "until": None}
    for field in times:
        given = (query.get(field) or "").strip()
        if given:
            try:
                times[field] = _parse_time(given, field)
            except ValueError as exc:
                errors.append(str(exc))

    def text(name: str) -> str | None:
        return (query.get(name) or "").strip() or None

    where = data.TaskFilter(
        task_id=text("task_id"),
        name=text("name"),
        state=text("state"),
        queue=text("queue"),
        worker=text("worker"),
        since=times["since"],
        until=times["until"],
    )
    return where, errors


def tasks(request: Request) -> Response:
    settings = settings_of(request)
    where, errors = _filter(request.query_params)
    after = None
    if request.query_params.get("after"):
        try:
            after = data.Position.decode(request.query_params["after"])
        except ValueError as exc:
            errors.append(str(exc))
    page = data.TaskSearchPage(items=[], next=None)
    flight: list[data.InFlight] = []
    if not errors:

        def read(conn: psycopg.Connection) -> tuple[data.TaskSearchPage, list[data.InFlight]]:
            found = data.search_tasks(conn, settings.schema, where, after=after)
            # In-flight messages match only on what a message holds, and are
            # shown on the first page.
            by_message = not (where.state or where.worker or where.since or where.until)
            flying = (
                data.in_flight(conn, settings.schema, where) if after is None and by_message else []
            )
            return found, flying

        page, flight = settings.run(read)
    form = {
        k: request.query_params.get(k, "")
        for k in ("task_id", "name", "state", "queue", "worker", "since", "until")
    }
    given = {k: v for k, v in form.items() if v}
    next_query = None
    if page.next is not None:
        next_query = {**given, "after": page.next.encode()}
    return render(
        request,
        "tasks.html",
        page="tasks",
        form=form,
        states=STATES,
        errors=errors,
        results=page,
        in_flight=flight,
        next_query=next_query,
        first_query=given if after is not None else None,
    )


# --- one task ----------------------------------------------------------------------


@dataclasses.dataclass
class Event:
    """One line of a task's timeline."""

    at: datetime
    what: str
    detail: str


def timeline(detail: admin.TaskDetail) -> list[Event]:
    """What pgbroker recorded about a task, oldest first.

    Celery keeps only a task's latest state; the times here are those the
    tables hold: messages published and claimed (a message is deleted once
    acked), redeliveries and their reasons, dead letters, the result's first
    and last write, and when the run that stored the result was received
    and started (017_history.sql).
    """
    events = []
    for m in detail.messages:
        events.append(Event(m.published_at, "published", f"queue {m.queue}"))
        if m.claimed_at:
            events.append(
                Event(m.claimed_at, "received", f"delivery {m.delivery_count}, {m.state}")
            )
    for r in detail.redeliveries:
        events.append(
            Event(r.at, "redelivered", f"{r.reason} (queue {r.queue}, delivery {r.delivery_count})")
        )
    for d in detail.dead_letters:
        events.append(
            Event(d.died_at, "dead-lettered", f"{d.reason} (delivery {d.delivery_count})")
        )
    result = detail.result
    if result is not None:
        claimed = {m.claimed_at for m in detail.messages}
        runs = [(r.received_at, r.started_at) for r in result.retry_log]
        runs.append((result.received_at, result.started_at))
        for n, (received, started) in enumerate(runs, 1):
            run = f"run {n}" if len(runs) > 1 else "run"
            if received and received not in claimed:
                events.append(Event(received, "received", f"{run}: message claimed"))
            if started:
                events.append(Event(started, "started", f"{run}: task body (worker's clock)"))
        for n, retry in enumerate(result.retry_log, 1):
            if retry.at:
                events.append(Event(retry.at, "RETRY", f"run {n}: {retry.reason or ''}"))
        if result.updated_at != result.created_at:
            # Only for a row written more than once: a row written once is
            # told by its one state below (its date_done is the worker's
            # clock and created_at the server's: they may sort either way).
            events.append(Event(result.created_at, "first state stored", ""))
        retries = f", retries {result.retries}" if result.retries else ""
        if result.date_done:
            events.append(Event(result.date_done, result.state, f"done{retries}"))
        else:
            events.append(Event(result.updated_at, result.state, f"latest state{retries}"))
    events.sort(key=lambda e: e.at)
    return events


def _task_id(request: Request) -> str:
    task_id = request.query_params.get("id", "").strip()
    if not task_id:
        raise NotFound("no task id given (/task?id=TASK_ID)")
    return task_id


def task(request: Request) -> Response:
    settings = settings_of(request)
    task_id = _task_id(request)

    def read(conn: psycopg.Connection) -> dict[str, Any]:
        durable = data.durable(conn, settings.schema, task_id)
        try:
            detail = admin.show_task(conn, settings.schema, task_id)
        except NotFound:
            if not durable:
                raise
            # A durable task whose message is acked and whose result is in
            # another backend, not stored yet, or expired: its steps remain.
            detail = admin.TaskDetail(task_id, None, [], [], [])
        tree = data.canvas(conn, settings.schema, detail.result) if detail.result else []
        return {"detail": detail, "canvas": tree, "durable": durable}

    found = settings.run(read)
    detail: admin.TaskDetail = found["detail"]
    result = detail.result
    shown = {}
    if result is not None:
        shown = {field: values.shown(getattr(result, field)) for field in FIELDS}
    durable: data.Durable = found["durable"]
    name = result.name if result else next((m.headers.get("task") for m in detail.messages), None)
    name = name or durable.task_name
    return render(
        request,
        "task.html",
        page="tasks",
        task_id=task_id,
        name=name,
        detail=detail,
        result=result,
        shown=shown,
        timeline=timeline(detail),
        canvas=found["canvas"],
        durable=durable,
    )


def task_value(request: Request) -> Response:
    """One value of a task whole, as plain text: ``field`` is one of FIELDS,
    or ``step`` with ``index`` for a durable step's output."""
    settings = settings_of(request)
    task_id = _task_id(request)
    field = request.query_params.get("field", "")

    def read(conn: psycopg.Connection) -> Any:
        if field == "step":
            try:
                index = int(request.query_params.get("index", ""))
            except ValueError:
                raise NotFound("a step's output needs its index (&index=N)") from None
            steps = data.durable(conn, settings.schema, task_id).steps
            step = next((s for s in steps if s.index == index), None)
            if step is None:
                raise NotFound(f"task {task_id!r} has no step {index}")
            return step.output
        if field not in FIELDS:
            raise NotFound(f"no field {field!r}: one of {', '.join(FIELDS)} or step")
        result = admin.show_task(conn, settings.schema, task_id).result
        if result is None:
            raise NotFound(f"task {task_id!r} has no stored result")
        return getattr(result, field)

    return PlainTextResponse(values.as_text(settings.run(read)))


# --- dead letters, redeliveries, beat, durable runs ------------------------------


def _text(request: Request, name: str) -> str | None:
    return (request.query_params.get(name) or "").strip() or None


def dead_letters(request: Request) -> Response:
    settings = settings_of(request)
    queue, reason = _text(request, "queue"), _text(request, "reason")

    def read(conn: psycopg.Connection) -> tuple[admin.DeadLetterPage, dict[str, int]]:
        page = admin.list_dead_letters(conn, settings.schema, queue=queue, reason=reason, limit=100)
        return page, data.dead_letter_reasons(conn, settings.schema)

    page, reasons = settings.run(read)
    return render(
        request,
        "dead_letters.html",
        page="dead_letters",
        form={"queue": queue or "", "reason": reason or ""},
        reasons=reasons,
        letters=page,
    )


def dead_letter(request: Request) -> Response:
    settings = settings_of(request)
    try:
        id = int(request.query_params.get("id", ""))
    except ValueError:
        raise NotFound("a dead letter is named by its number (/dead-letter?id=N)") from None
    found = settings.run(lambda conn: data.dead_letter(conn, settings.schema, id))
    if found is None:
        raise NotFound(f"no dead letter {id} (replayed or dropped since?)")
    return render(
        request,
        "dead_letter.html",
        page="dead_letters",
        letter=found,
        body=values.shown(found.body),
        headers=values.shown(_pretty(found.headers)),
        properties=values.shown(_pretty(found.properties)),
    )


def _pretty(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def redeliveries(request: Request) -> Response:
    settings = settings_of(request)
    reason = _text(request, "reason")
    counts, recent = settings.run(
        lambda conn: data.redeliveries(conn, settings.schema, reason=reason)
    )
    return render(
        request,
        "redeliveries.html",
        page="redeliveries",
        reason=reason,
        counts=counts,
        recent=recent,
    )


def beat(request: Request) -> Response:
    settings = settings_of(request)
    entries = settings.run(lambda conn: data.beat_entries(conn, settings.schema))
    return render(
        request, "beat.html", page="beat", entries=entries, now=datetime.now(timezone.utc)
    )


def durable_runs(request: Request) -> Response:
    settings = settings_of(request)

    def read(conn: psycopg.Connection) -> tuple[list[data.Run], list[WaitRecord]]:
        return data.durable_runs(conn, settings.schema), waiting(conn, schema=settings.schema)

    runs, waits = settings.run(read)
    return render(request, "durable.html", page="durable", runs=runs, waits=waits)


# --- errors ------------------------------------------------------------------------


def not_found(request: Request, exc: Exception) -> Response:
    return render(
        request,
        "error.html",
        status_code=404,
        title="Not found",
        message=safe_message(request, exc),
    )


def failed(request: Request, exc: Exception) -> Response:
    message = safe_message(request, exc)
    logger.warning("dashboard: %s %s failed: %s", request.method, request.url.path, message)
    return render(
        request,
        "error.html",
        status_code=503,
        title="The database did not answer as expected",
        message=message,
    )


def forbidden(request: Request, exc: Exception) -> Response:
    logger.warning("dashboard: %s %s refused: %s", request.method, request.url.path, exc)
    return render(
        request, "error.html", status_code=403, title="Refused", message=safe_message(request, exc)
    )


def bad_request(request: Request, exc: Exception) -> Response:
    return render(
        request,
        "error.html",
        status_code=400,
        title="Not done",
        message=safe_message(request, exc),
    )
