"""When a task's run was received and started, for its stored result.

Celery keeps only a task's latest state: once it is done, nothing says
when it was received or started, or why it was retried. The result backend
keeps both times with each state it stores (``task_result.received_at``
and ``started_at``, 017_history.sql), of the run that stored it, and a log
of the retries with each run's times, for the dashboard's timeline and
``pgbroker tasks show``:

- received: when pgbroker's consumer claimed the run's message (the
  server's clock), from the delivery property ``pgbroker_received_at``;
  unknown for a message from another broker;
- started: when the task body started (the worker's clock, as Celery's
  date_done is), noted on the task's request at ``task_prerun``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from celery import signals

from pgbroker.broker.messages import CONSUMER_ID, RECEIVED_AT

#: The attribute of a task's request (celery.app.task.Context) that holds
#: when its body started.
STARTED_AT = "pgbroker_started_at"


def received_at(request: Any) -> str | None:
    """When pgbroker delivered the message of the run of ``request`` (ISO
    8601), None if it did not."""
    props = getattr(request, "properties", None)
    if not isinstance(props, dict) or not isinstance(props.get(CONSUMER_ID), int):
        return None
    at = props.get(RECEIVED_AT)
    return at if isinstance(at, str) else None


def started_at(request: Any) -> datetime | None:
    at = getattr(request, STARTED_AT, None)
    return at if isinstance(at, datetime) else None


#: A retry's reason is cut at this many characters (its traceback is not kept).
MAX_REASON = 500


def retry_reason(exc: Any) -> str:
    """What a RETRY state keeps in ``retry_log``: the exception's type and
    message (``exc`` as the backend stores it: the exception itself, or as
    Celery's prepare_exception gives it to a JSON or msgpack backend)."""
    if isinstance(exc, BaseException):
        reason = f"{type(exc).__name__}: {exc}"
    elif isinstance(exc, dict) and "exc_type" in exc:
        args = exc.get("exc_message")
        if isinstance(args, (list, tuple)):
            args = args[0] if len(args) == 1 else tuple(args)  # as str(exc) shows them
        reason = f"{exc['exc_type']}: {args}"
    else:
        reason = repr(exc)
    reason = reason.replace("\0", "\\x00")  # (text cannot hold U+0000)
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 1] + "…"


def _note_started(task: Any = None, **_: Any) -> None:
    request = getattr(task, "request", None)
    if request is not None:
        setattr(request, STARTED_AT, datetime.now(timezone.utc))


signals.task_prerun.connect(_note_started, weak=False, dispatch_uid="pgbroker.results.started")
