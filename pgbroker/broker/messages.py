"""A Kombu message and its row: what a publish stores and a claim hands out.

A publication's fields (Celery's ``eta``, ``expires``, ``retries`` headers,
the source that makes it a duplicate) become the parameters of ``publish``
(:file:`sql/queries.sql`); a claimed row becomes the message dict Kombu's
virtual channel expects (``to_raw``).
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from typing import Any

from kombu.utils import json
from psycopg.types.json import Jsonb

#: A property of every delivered message: the schema's oid, which says that
#: its ``delivery_tag`` is the id of its row in that schema. A Celery worker
#: hands the properties to the task run (its request's ``properties``), so
#: what that run publishes says which message's run published it (publish
#: deduplication, see ``_publication_source``).
SCHEMA_OID = "pgbroker_schema_oid"

_PROPERTIES_NOT_STORED = ("delivery_tag", "delivery_info", "body_encoding", SCHEMA_OID)


def to_raw(row: Any, schema_oid: int) -> dict[str, Any]:
    """A claimed row as the message dict Kombu's virtual channel expects;
    ``schema_oid``: the oid of the schema it was claimed from (SCHEMA_OID)."""
    (
        id_,
        priority,
        delivery_count,
        exchange,
        routing_key,
        content_type,
        content_encoding,
        headers,
        properties,
        body,
        was_delayed,
    ) = row
    if was_delayed and isinstance(headers, dict) and headers.get("eta"):
        # pgbroker kept the message until its eta (or an operator made it
        # due earlier): it is due now. Without the header, Celery's worker
        # runs it at once instead of scheduling it again by its own clock.
        headers["eta"] = None
    props = properties
    redelivered = delivery_count > 1
    props.update(
        delivery_tag=id_,
        body_encoding=None,
        **{SCHEMA_OID: schema_oid},
        delivery_info={
            "exchange": exchange,
            "routing_key": routing_key,
            "priority": priority,
            "redelivered": redelivered,
        },
    )
    return {
        "body": bytes(body),
        "content-type": content_type,
        "content-encoding": content_encoding,
        "headers": headers,
        "properties": props,
        "redelivered": redelivered,
    }


def _ms_to_seconds(value: Any) -> float | None:
    if value is None or value == "":
        return None
    return float(value) / 1000.0


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _timestamp(value: Any) -> datetime | None:
    """Celery's ``eta``/``expires`` header (ISO 8601) as an aware datetime;
    naive means UTC (as Celery's worker reads it with ``enable_utc``). A
    value that is not a time is left to Celery's worker to report."""
    if not value:
        return None
    try:
        when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def _publication_source(properties: dict[str, Any], schema_oid: int) -> str | None:
    """What makes a publication a duplicate when it is made again: 'copy
    <tag>' for a copy of a delivered message, 'run <id>' for a publication
    of the task run of message <id>, None (never a duplicate) otherwise.

    A copy: celery.contrib.migrate (``celery migrate``) republishes a
    message with its properties, delivery tag included, which a virtual
    transport (Redis, SQS, pgbroker) keeps with the message for good.
    A run: Celery's worker hands a delivered message's properties to the
    task run (``Task.request.properties``): its delivery tag is the message
    id, in the schema ``to_raw`` named there. A run of a message delivered
    by another schema or broker (its ids are another sequence's) counts as
    no run. Celery is looked up only if it is loaded: plain Kombu users
    publish outside task runs.
    """
    tag = properties.get("delivery_tag")
    if tag is not None:
        return f"copy {tag}"
    state = sys.modules.get("celery._state")
    if state is None:
        return None
    task = state.get_current_worker_task()
    props = getattr(getattr(task, "request", None), "properties", None)
    if not isinstance(props, dict) or props.get(SCHEMA_OID) != schema_oid:
        return None
    message_id = props.get("delivery_tag")
    return f"run {message_id}" if isinstance(message_id, int) else None


def _retries(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _json(value: Any) -> Jsonb | None:
    return Jsonb(value, dumps=json.dumps) if value else None


def _load_json(data: str | bytes) -> Any:
    # kombu.utils.json turns {"__type__": "datetime", ...} back into objects.
    return json.loads(data)
