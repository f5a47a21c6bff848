"""A Kombu message and its row: what a publish stores and a claim hands out.

A publication's fields (Celery's ``eta``, ``expires``, ``retries`` headers,
the source that makes it a duplicate) become the parameters of ``publish``
(:file:`sql/queries.sql`); a claimed row becomes the message dict Kombu's
virtual channel expects (``to_raw``).
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from typing import Any

from kombu.utils import json
from psycopg.types.json import Json, Jsonb

from pgbroker.errors import MessageTooLarge
from pgbroker.logs import recovery

logger = logging.getLogger("pgbroker.broker")

#: A property of every delivered message: the schema's oid, which says that
#: its ``delivery_tag`` is the id of its row in that schema. A Celery worker
#: hands the properties to the task run (its request's ``properties``), so
#: what that run publishes says which message's run published it (publish
#: deduplication, see ``_publication_source``).
SCHEMA_OID = "pgbroker_schema_oid"

#: A property of every message delivered to a consumer that acknowledges:
#: the id of that consumer, which holds the message (the fence of
#: ``finish_ack``, :mod:`pgbroker.broker.finish`).
CONSUMER_ID = "pgbroker_consumer_id"

#: A property of every message delivered to a consumer that acknowledges:
#: the server, database and schema it came from (``database_fingerprint``
#: in sql/enqueue.sql). A result backend with the same fingerprint may
#: acknowledge it with the task's result (:mod:`pgbroker.broker.finish`).
ORIGIN = "pgbroker_origin"

#: A property of every message delivered to a consumer that acknowledges:
#: how many times it was delivered, this delivery included. A delivery whose
#: session was lost still holds its message while the count has not grown
#: (nobody has had it since): ``ack_orphaned`` and ``finish_ack``.
DELIVERY_COUNT = "pgbroker_delivery_count"

#: A property of every message delivered to a consumer that acknowledges:
#: when it was published (ISO 8601). With its id, this names the message for
#: good: ids are handed out again after a server lost its last commits
#: (``ack_orphaned``), publication times are not.
PUBLISHED_AT = "pgbroker_published_at"

#: A property of every message delivered to a consumer that acknowledges:
#: when this delivery claimed it (ISO 8601, the server's clock), which the
#: result backend keeps as the task's ``received_at`` (017_history.sql).
RECEIVED_AT = "pgbroker_received_at"

#: A property of every message delivered to a consumer that acknowledges:
#: the server's timeline when it was claimed (018_server_timeline; None
#: where the server does not say). A finish on another timeline writes
#: nothing (``finish_ack``): the old primary's lost commits may hold the
#: run's work.
TIMELINE = "pgbroker_timeline"

_PROPERTIES_NOT_STORED = (
    "delivery_tag",
    "delivery_info",
    "body_encoding",
    SCHEMA_OID,
    CONSUMER_ID,
    ORIGIN,
    DELIVERY_COUNT,
    PUBLISHED_AT,
    RECEIVED_AT,
    TIMELINE,
)


def publish_params(
    message: dict[str, Any],
    exchange: str,
    routing_key: str,
    *,
    priority: int,
    max_message_size: int,
    schema_oid: int | None,
) -> dict[str, Any]:
    """The parameters of ``publish`` (:file:`sql/queries.sql`) for a Kombu
    message, but its route's. ``schema_oid``: the oid of the publishing
    session's schema, or None when deduplication is off (``dedup_window``
    0). Raises MessageTooLarge above ``max_message_size``."""
    body = message.get("body") or b""
    if isinstance(body, str):
        body = body.encode(message.get("content-encoding") or "utf-8")
    props = message.get("properties") or {}
    headers = message.get("headers") or {}
    # Headers count too (stored as JSON next to the body); dumped once.
    headers_json = json.dumps(headers)
    size = len(body) + (len(headers_json) if headers else 0)
    if size > max_message_size:
        parts = f" (body {len(body)}, headers {len(headers_json)})" if headers else ""
        raise MessageTooLarge(
            f"message for exchange {exchange!r} routing key {routing_key!r} is "
            f"{size} bytes{parts}, more than max_message_size="
            f"{max_message_size}: send a reference to the data instead, "
            "or raise the max_message_size transport option"
        )
    task_id = _text_or_none(headers.get("id"))
    task_name = _text_or_none(headers.get("task"))
    # A Celery task message (protocol 2: id and task in the headers)
    # published by a task run, or copied, is stored once per (task id,
    # retries, source): see `publish` in queries.sql.
    source = (
        _publication_source(props, schema_oid)
        if schema_oid is not None and task_id is not None and task_name is not None
        else None
    )
    dedup = source is not None
    return dict(
        exchange=exchange,
        routing_key=routing_key,
        priority=priority,
        ttl=_ms_to_seconds(props.get("expiration")),
        persistent=props.get("delivery_mode", 2) != 1,
        task_id=task_id,
        task_name=task_name,
        dedup=dedup,
        retries=_retries(headers.get("retries")) if dedup else 0,
        source=source,
        eta=_timestamp(headers.get("eta")) if task_name is not None else None,
        expires=_timestamp(headers.get("expires")) if task_name is not None else None,
        content_type=message.get("content-type"),
        content_encoding=message.get("content-encoding"),
        # json, not jsonb: see the message table in 001_broker.sql.
        headers=Json(headers, dumps=lambda _: headers_json),
        properties=Json(
            {k: v for k, v in props.items() if k not in _PROPERTIES_NOT_STORED},
            dumps=json.dumps,
        ),
        body=body,
    )


def log_publish_outcome(row: Any, params: dict[str, Any]) -> None:
    """Say what ``publish`` or ``publish_routing`` (their ``row``, run with
    ``params``) did not store: a duplicate publication, or a message that
    matched no queue (kept in dead_letter)."""
    if row[4]:
        logger.info(
            "task %s (%s, retries %s) was already published to exchange %r with "
            "routing key %r by the same source (%s): not stored again "
            "(dedup_window transport option)",
            params["task_id"],
            params["task_name"],
            params["retries"],
            params["exchange"],
            params["routing_key"],
            params["source"],
            extra=recovery("dedup", task_id=params["task_id"], reason=params["source"]),
        )
    elif row[0] == 0 and row[1]:
        logger.warning(
            "message to exchange %r with routing key %r matched no queue; "
            "kept in the dead_letter table",
            params["exchange"],
            params["routing_key"],
            extra=recovery("dead_letter", task_id=params["task_id"], reason="unroutable", count=1),
        )


def to_raw(
    row: Any,
    schema_oid: int,
    consumer_id: int | None = None,
    origin: str | None = None,
    timeline: int | None = None,
) -> dict[str, Any]:
    """A claimed row as the message dict Kombu's virtual channel expects;
    ``schema_oid``: the oid of the schema it was claimed from (SCHEMA_OID);
    ``consumer_id``, ``origin`` and ``timeline``: the consumer that holds it,
    where and on which timeline (CONSUMER_ID, ORIGIN, TIMELINE, with
    DELIVERY_COUNT, PUBLISHED_AT and RECEIVED_AT), None when it was removed
    as it was claimed (no ack)."""
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
        published_at,
        claimed_at,
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
        **(
            {
                CONSUMER_ID: consumer_id,
                ORIGIN: origin,
                DELIVERY_COUNT: delivery_count,
                PUBLISHED_AT: published_at.isoformat(),
                RECEIVED_AT: claimed_at.isoformat(),
                TIMELINE: timeline,
            }
            if consumer_id is not None
            else {}
        ),
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
