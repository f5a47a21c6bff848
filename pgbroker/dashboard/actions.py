"""The dashboard's actions: the forms that change data.

Each is a POST route, refused unless the app was built with
``actions=True`` (which needs a token, so every request is authenticated by
:mod:`pgbroker.dashboard.auth` first). An action:

1. refuses at once when actions are off (403), before reading the body;
2. reads the form (urlencoded, small: python-multipart parses it);
3. passes :func:`pgbroker.dashboard.web.check_form` (the CSRF checks);
4. checks that the dashboard's database role may write pgbroker's tables
   (:func:`may_act`): a role with SELECT alone gets a 403 page saying
   which privileges it lacks, not a database error halfway;
5. acts through pgbroker's own API (:mod:`pgbroker.operations.admin`,
   :func:`pgbroker.durable.send_event`, :mod:`pgbroker.operations.beat`);
6. logs who did what (:func:`pgbroker.dashboard.web.log_action`) and
   renders what was done.

Every action is safe to repeat: a dead letter replayed or dropped is gone
(a second try finds nothing), an event is kept by name (sending it again
keeps the first payload), enabling an enabled entry changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg

# request.form() needs it; imported here, a missing one fails in create_app,
# which names the extra to install.
import python_multipart  # noqa: F401
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response

from pgbroker.dashboard import csrf
from pgbroker.dashboard.web import Settings, check_form, log_action, render, settings_of
from pgbroker.database import schema as pg_schema
from pgbroker.durable.waits import send_event
from pgbroker.errors import EntryNotFound, NotFound, SchemaError
from pgbroker.operations import admin, beat

T = TypeVar("T")

#: The largest event payload accepted from the form (characters of JSON).
MAX_PAYLOAD = 100_000


class Refused(Exception):
    """The action may not run (the role's privileges, a missing confirmation):
    a 403 page with the message."""


class BadForm(Exception):
    """The form is wrong (a payload that is not JSON, a missing field): a
    400 page with the message."""


# --- the steps every action takes ----------------------------------------------------


async def _form(request: Request) -> FormData:
    """The action's form, once actions are known to be on and it passed the
    CSRF checks."""
    settings = settings_of(request)
    if not settings.actions:
        check_form(request, None)  # raises: actions are off
    form = await request.form(max_files=0, max_fields=20, max_part_size=MAX_PAYLOAD + 1000)
    token = form.get(csrf.FIELD)
    check_form(request, token if isinstance(token, str) else None)
    return form


def _field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def may_act(conn: psycopg.Connection, schema: str) -> None:
    """Raise Refused unless this session's role may write every table of
    the schema, which is at this pgbroker's version (an action never
    migrates)."""
    version = pg_schema.current_version(conn, schema)
    if version is None or version < pg_schema.latest_version():
        raise Refused(
            f"schema {schema!r} is at version {version}, this pgbroker needs "
            f"{pg_schema.latest_version()} to act on it: run `pgbroker migrate` as the "
            "database owner"
        )
    try:
        pg_schema.check_access(conn, schema)
    except SchemaError as exc:
        raise Refused(
            f"the dashboard's database role may only read, so it cannot act ({exc}). Give "
            "the dashboard a role that may write pgbroker's tables (as a worker's), or "
            "start it without --actions"
        ) from None


def check_actions(settings: Settings) -> None:
    """At start, with actions on: raise Refused unless the role may act."""
    settings.act(lambda conn: may_act(conn, settings.schema))


async def _act(settings: Settings, fn: Callable[[psycopg.Connection], T]) -> T:
    """Run ``fn`` once, after may_act, on a connection of the app's pool."""

    def run(conn: psycopg.Connection) -> T:
        may_act(conn, settings.schema)
        return fn(conn)

    return await run_in_threadpool(settings.act, run)


def _done(request: Request, title: str, lines: list[str], back: str, **links: Any) -> Response:
    return render(
        request, "action_done.html", page=back, title=title, lines=lines, back=back, links=links
    )


# --- dead letters ------------------------------------------------------------------


def _selection(form: FormData) -> tuple[list[int] | None, str | None, str | None]:
    """One dead letter (``id``), or all matching ``queue`` and ``reason``
    (``all=1``)."""
    if _field(form, "all") == "1":
        return None, _field(form, "queue") or None, _field(form, "reason") or None
    try:
        return [int(_field(form, "id"))], None, None
    except ValueError:
        raise BadForm("name a dead letter (id) or choose all that match") from None


def _what(ids: list[int] | None, queue: str | None, reason: str | None) -> str:
    if ids is not None:
        return f"dead letter {ids[0]}"
    where = [f"queue {queue!r}" if queue else "", f"reason {reason!r}" if reason else ""]
    given = " and ".join(w for w in where if w)
    return "every dead letter" + (f" of {given}" if given else "")


async def replay_dead_letters(request: Request) -> Response:
    form = await _form(request)
    settings = settings_of(request)
    ids, queue, reason = _selection(form)
    result = await _act(
        settings,
        lambda conn: admin.replay_dead_letters(
            conn, settings.schema, ids, queue=queue, reason=reason
        ),
    )
    log_action(
        request,
        "replay_dead_letters",
        ids=ids,
        queue=queue,
        reason=reason,
        replayed=result.replayed,
    )
    lines = [f"Replayed {result.replayed} ({_what(ids, queue, reason)})."]
    lines += [f"{n} message(s) to queue {q}" for q, n in sorted(result.messages.items())]
    lines += [f"Kept dead letter {k.id}: {k.why}" for k in result.kept]
    if result.not_found:
        lines.append(
            "Not found (replayed or dropped since?): " + ", ".join(map(str, result.not_found))
        )
    task_id = _task_of(form)
    return _done(request, "Replayed", lines, "dead_letters", task=task_id)


async def drop_dead_letters(request: Request) -> Response:
    form = await _form(request)
    settings = settings_of(request)
    ids, queue, reason = _selection(form)
    if ids is None and _field(form, "confirm") != "yes":
        raise Refused("dropping every matching dead letter needs the confirmation box ticked")
    result = await _act(
        settings,
        lambda conn: admin.drop_dead_letters(
            conn, settings.schema, ids, queue=queue, reason=reason
        ),
    )
    log_action(
        request, "drop_dead_letters", ids=ids, queue=queue, reason=reason, dropped=result.dropped
    )
    lines = [f"Dropped {result.dropped} ({_what(ids, queue, reason)}) for good."]
    if result.not_found:
        lines.append(
            "Not found (replayed or dropped since?): " + ", ".join(map(str, result.not_found))
        )
    return _done(request, "Dropped", lines, "dead_letters")


def _task_of(form: FormData) -> str | None:
    return _field(form, "task_id") or None


# --- durable events ----------------------------------------------------------------


async def send_durable_event(request: Request) -> Response:
    form = await _form(request)
    settings = settings_of(request)
    event = _field(form, "event")
    if not event:
        raise BadForm("an event needs a name")
    text = _field(form, "payload")
    if len(text) > MAX_PAYLOAD:
        raise BadForm(f"the payload is longer than {MAX_PAYLOAD} characters")
    try:
        payload = json.loads(text) if text else None
    except ValueError as exc:
        raise BadForm(f'the payload is not JSON ({exc}); a string is written "yes"') from None
    sent = await _act(
        settings, lambda conn: send_event(conn, event, payload, schema=settings.schema)
    )
    log_action(request, "send_event", event=event, waiting=sent.waiting, woken=len(sent.woken))
    lines = [
        f"Event {event!r} sent" + ("." if sent.recorded else " before: the first payload is kept."),
        f"{sent.waiting} task(s) waiting on it; {len(sent.woken)} woken now (a task between "
        "two runs gets the event when it next reaches its wait).",
    ]
    return _done(request, "Event sent", lines, "durable", woken=sent.woken or None)


# --- beat --------------------------------------------------------------------------


async def _set_enabled(request: Request, enabled: bool) -> Response:
    form = await _form(request)
    settings = settings_of(request)
    entry = _field(form, "entry")
    if not entry:
        raise BadForm("name the beat entry")

    def change(conn: psycopg.Connection) -> beat.BeatEntry:
        # beat's runtime API opens its own session from the URL; may_act
        # has checked the schema's version, so it finds nothing to migrate.
        try:
            return beat.update_entry(settings.url, entry, enabled=enabled, schema=settings.schema)
        except EntryNotFound:
            raise NotFound(f"no beat entry {entry!r} (removed since?)") from None

    await _act(settings, change)
    action = "enable_beat_entry" if enabled else "disable_beat_entry"
    log_action(request, action, entry=entry)
    state = "enabled: it runs from now on" if enabled else "disabled: it is not sent any more"
    return _done(request, "Beat", [f"Entry {entry!r} {state}."], "beat")


async def enable_beat_entry(request: Request) -> Response:
    return await _set_enabled(request, True)


async def disable_beat_entry(request: Request) -> Response:
    return await _set_enabled(request, False)
