"""Every transport option, with its default, in one place.

Set them in Celery's ``broker_transport_options`` (or Kombu's
``Connection(transport_options=...)``)::

    broker_transport_options = {"schema": "jobs", "sweep_interval": 5}

An unknown option is an error, so a typo does not pass silently. Kombu's own
connection-retry options (``max_retries``, ``interval_start``...) are
accepted and left to Kombu: Celery and ``Producer.publish(retry=True)`` put
them in the same dictionary.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar

from pgbroker.errors import ConfigurationError

MiB = 1024 * 1024

_WHERE = "broker_transport_options"

T = TypeVar("T")


# --- one validation for every setting of every feature ------------------------------
#
# Broker, result backend, beat and durable settings all go through these, so
# that a wrong value fails at connect with an error naming the option and what
# it accepts. NaN and infinities are refused (NaN compares false with
# everything: sweep_interval=NaN used to pass and stop crash recovery).

#: PostgreSQL's largest field value (1 GiB - 1).
MAX_FIELD = 2**30 - 1
#: One day: the longest interval between two periodic passes.
DAY = 86400.0
#: Ten years: the longest retention or deduplication window.
TEN_YEARS = 3650 * DAY

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def _bad(where: str, name: str, rule: str, value: Any, accepted: str = "") -> ConfigurationError:
    prefix = f"{where}: {name!r}" if where else name
    note = f" (accepted: {accepted})" if accepted else ""
    return ConfigurationError(f"{prefix} must be {rule}, got {value!r}{note}")


def flag(where: str, name: str, value: Any) -> bool:
    """True or False; also the strings Celery's own boolean settings take."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _bad(
        where, name, "True or False", value, "also 'true'/'false', 'yes'/'no', 'on'/'off', '1'/'0'"
    )


def _number(value: Any, *, integer: bool) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if integer and value != int(value):
        return None
    return value


def seconds(
    where: str, name: str, value: Any, *, zero: str | None = None, maximum: float = DAY
) -> float:
    """A finite number of seconds (or a timedelta), > 0; >= 0 when ``zero``
    says what 0 means."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    number = _number(value, integer=False)
    low = f">= 0 ({zero})" if zero else "> 0"
    accepted = f"{'0 <=' if zero else '0 <'} seconds <= {maximum:g}"
    if number is None or number < 0 or (number == 0 and not zero) or number > maximum:
        raise _bad(where, name, f"a number of seconds {low}", value, accepted)
    return float(number)


def whole(
    where: str,
    name: str,
    value: Any,
    *,
    minimum: int,
    maximum: int,
    unit: str = "",
    zero: str | None = None,
) -> int:
    """A whole number from ``minimum`` to ``maximum`` (0 meaning ``zero``)."""
    number = _number(value, integer=True)
    what = f"a whole number{' of ' + unit if unit else ''}"
    if zero:
        rule, minimum = f"{what} >= 0 ({zero})", 0
    else:
        rule = f"{what} > 0" if minimum == 1 else f"{what} >= {minimum}"
    if number is None or not minimum <= number <= maximum:
        raise _bad(where, name, rule, value, f"{minimum} to {maximum}")
    return int(number)


def schema_name(where: str, name: str, value: Any) -> str:
    """A schema name pgbroker can use: 1 to 63 bytes of anything but '%' and NUL
    (pgbroker's queries run with parameters, where psycopg reads every '%')."""
    if not isinstance(value, str) or not 1 <= len(value.encode()) <= 63:
        raise _bad(where, name, "a name of 1 to 63 bytes (PostgreSQL's limit)", value)
    if "%" in value or "\0" in value:
        raise _bad(
            where,
            name,
            "a name without '%' or NUL (psycopg would read '%' as a query placeholder)",
            value,
        )
    return value


def checked_fields(where: str, options: Any) -> dict[str, Any]:
    """Every field of a settings dataclass, checked by its ``check`` metadata."""
    return {
        f.name: f.metadata["check"](where, f.name, getattr(options, f.name))
        for f in dataclasses.fields(options)
        if "check" in f.metadata
    }


def checked(default: Any, check: Callable[[str, str, Any], Any]) -> Any:
    """A dataclass field whose value ``validated`` checks with ``check``."""
    return dataclasses.field(default=default, metadata={"check": check})


def validated(where: str, options: T) -> T:
    """``options`` (a settings dataclass) with every checked field checked
    and normalised ("false" -> False, "10" -> 10.0)."""
    return dataclasses.replace(options, **checked_fields(where, options))  # type: ignore[type-var]


@dataclasses.dataclass(frozen=True)
class TransportOptions:
    #: PostgreSQL schema that holds pgbroker's tables.
    schema: str = checked("pgbroker", schema_name)
    #: Create or upgrade the schema on first connect. Turn off when a DBA
    #: runs ``pgbroker migrate`` instead; a missing schema is then an error.
    auto_migrate: bool = checked(True, flag)
    #: Seconds between safety sweeps: requeue messages of dead consumers,
    #: remove expired messages and queues. One query per sweep.
    sweep_interval: float = checked(10.0, seconds)
    #: Largest message accepted by publish, in bytes: its body plus its
    #: headers (as JSON). Queue, exchange and routing key names may have at
    #: most 255 bytes (pgbroker.broker.channel.MAX_NAME_BYTES).
    max_message_size: int = checked(
        16 * MiB, partial(whole, minimum=1, maximum=MAX_FIELD, unit="bytes")
    )
    #: Kombu's generic option; pgbroker is woken by LISTEN/NOTIFY, so this is
    #: only the longest wait between checks in blocking ``drain_events``.
    polling_interval: float = checked(10.0, seconds)
    #: One process per schema watches for dead consumers inside PostgreSQL
    #: and recovers their messages within a second instead of a
    #: sweep_interval; each consuming process keeps one extra session for
    #: it (see pgbroker.broker.sweeper). False: only the periodic sweep.
    fast_recovery: bool = checked(True, flag)
    #: A message delivered this many times without being acknowledged (its
    #: consumer died each time, or it was requeued) goes to ``dead_letter``
    #: instead of back to its queue; a Celery task gets a FAILURE result.
    #: 0 means no limit.
    max_deliveries: int = checked(
        10, partial(whole, minimum=0, maximum=2**31 - 1, zero="0: no limit")
    )
    #: Seconds during which publishing a Celery task message again with the
    #: same task id and ``retries`` (and the same routing) stores nothing: a
    #: chain's next link is sent once even when the task that sends it runs
    #: twice. 0 turns deduplication off. One hour (Redis's visibility_timeout
    #: default, which long tasks are already sized against): it must cover
    #: the time from a link's publish to its publish again by a re-run, i.e.
    #: the crash's recovery, the redelivered task's wait for a worker and its
    #: run time up to the publish (docs/delivery.md).
    dedup_window: float = checked(3600.0, partial(seconds, zero="0: off", maximum=TEN_YEARS))

    @classmethod
    def from_mapping(cls, given: dict[str, Any]) -> TransportOptions:
        known = {f.name: f for f in dataclasses.fields(cls)}
        ours = {}
        for name, value in given.items():
            if name in known:
                ours[name] = value
            elif name in KOMBU_OPTIONS:
                continue  # Kombu reads these from the same dictionary
            elif name in NOT_NEEDED:
                raise ConfigurationError(f"{_WHERE}: {name!r} {NOT_NEEDED[name]}; remove it")
            else:
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigurationError(
                    f"{_WHERE}: unknown option {name!r}.{hint} "
                    f"pgbroker takes: {', '.join(sorted(known))} (see pgbroker.options)."
                )
        return validated(_WHERE, cls(**ours))


#: Options Kombu itself reads from ``transport_options`` (connection retry
#: policy; ``Producer.publish(retry=True, retry_policy=...)`` copies its
#: policy in). pgbroker ignores them and Kombu applies them.
KOMBU_OPTIONS = frozenset(
    {
        "max_retries",
        "interval_start",
        "interval_step",
        "interval_max",
        "connect_retries_timeout",
        "errback",
        "callback",
        "on_revive",
        "retry_errors",
        "timeout",
    }
)

#: Options other transports take that pgbroker does not need.
NOT_NEEDED = {
    "visibility_timeout": (
        "is a Redis/SQS option and is not needed: pgbroker hands back a dead "
        "consumer's messages within one sweep_interval and never takes them "
        "from a live one, however long its tasks run"
    ),
    "unacked_restore_interval": "is a Redis option: see sweep_interval",
    "fanout_prefix": "is a Redis option: pgbroker keeps bindings in PostgreSQL",
    "fanout_patterns": "is a Redis option: pgbroker keeps bindings in PostgreSQL",
    "priority_steps": "is a Redis option: pgbroker supports priorities 0-9 natively",
    "sep": "is a Redis option",
    "queue_order_strategy": "is a Redis option: pgbroker serves by priority, then FIFO",
    "global_keyprefix": "is a Redis option: use the 'schema' option to separate apps",
    "socket_timeout": (
        "is a Redis option: set libpq's connect_timeout in the URL "
        "(?connect_timeout=5) or Celery's broker_connection_timeout"
    ),
    "socket_connect_timeout": (
        "is a Redis option: set libpq's connect_timeout in the URL "
        "(?connect_timeout=5) or Celery's broker_connection_timeout"
    ),
    "health_check_interval": (
        "is a Redis option: pgbroker notices a lost session at once (LISTEN socket); "
        "for dead networks set libpq's keepalives_idle in the URL"
    ),
    "max_connections": "is a Redis option: pgbroker uses one session per connection",
    "confirm_publish": "is an AMQP option: every pgbroker publish is committed when it returns",
    "body_encoding": "is not needed: pgbroker stores message bodies as bytes",
    "deadletter_queue": "is not needed: pgbroker keeps dead letters in its dead_letter table",
}
