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
from typing import Any

from pgbroker.errors import ConfigurationError

MiB = 1024 * 1024

_WHERE = "broker_transport_options"


@dataclasses.dataclass(frozen=True)
class TransportOptions:
    #: PostgreSQL schema that holds pgbroker's tables.
    schema: str = "pgbroker"
    #: Create or upgrade the schema on first connect. Turn off when a DBA
    #: runs ``pgbroker migrate`` instead; a missing schema is then an error.
    auto_migrate: bool = True
    #: Seconds between safety sweeps: requeue messages of dead consumers,
    #: remove expired messages and queues. One query per sweep.
    sweep_interval: float = 10.0
    #: Largest message body accepted by publish, in bytes.
    max_message_size: int = 16 * MiB
    #: Kombu's generic option; pgbroker is woken by LISTEN/NOTIFY, so this is
    #: only the longest wait between checks in blocking ``drain_events``.
    polling_interval: float = 10.0
    #: One process per schema watches for dead consumers inside PostgreSQL
    #: and recovers their messages within a second instead of a
    #: sweep_interval; each consuming process keeps one extra session for
    #: it (see pgbroker.sweeper). False: only the periodic sweep.
    fast_recovery: bool = True
    #: A message delivered this many times without being acknowledged (its
    #: consumer died each time, or it was requeued) goes to ``dead_letter``
    #: instead of back to its queue; a Celery task gets a FAILURE result.
    #: 0 means no limit.
    max_deliveries: int = 10
    #: Seconds during which publishing a Celery task message again with the
    #: same task id and ``retries`` (and the same routing) stores nothing: a
    #: chain's next link is sent once even when the task that sends it runs
    #: twice. 0 turns deduplication off. One hour (Redis's visibility_timeout
    #: default, which long tasks are already sized against): it must cover
    #: the time from a link's publish to its publish again by a re-run, i.e.
    #: the crash's recovery, the redelivered task's wait for a worker and its
    #: run time up to the publish (docs/delivery.md).
    dedup_window: float = 3600.0

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
        options = cls(**ours)
        options._check()
        return options

    def _check(self) -> None:
        if not isinstance(self.schema, str) or not 1 <= len(self.schema.encode()) <= 63:
            raise ConfigurationError(
                f"{_WHERE}: 'schema' must be a name of 1 to 63 bytes, got {self.schema!r}"
            )
        if not isinstance(self.auto_migrate, bool):
            raise ConfigurationError(
                f"{_WHERE}: 'auto_migrate' must be True or False, got {self.auto_migrate!r}"
            )
        if not isinstance(self.fast_recovery, bool):
            raise ConfigurationError(
                f"{_WHERE}: 'fast_recovery' must be True or False, got {self.fast_recovery!r}"
            )
        _positive("sweep_interval", self.sweep_interval)
        _positive("polling_interval", self.polling_interval)
        _positive("max_message_size", self.max_message_size, integer=True)
        if (
            isinstance(self.max_deliveries, bool)
            or not isinstance(self.max_deliveries, int)
            or self.max_deliveries < 0
        ):
            raise ConfigurationError(
                f"{_WHERE}: 'max_deliveries' must be a whole number >= 0 (0: no limit), "
                f"got {self.max_deliveries!r}"
            )
        if (
            isinstance(self.dedup_window, bool)
            or not isinstance(self.dedup_window, (int, float))
            or self.dedup_window < 0
        ):
            raise ConfigurationError(
                f"{_WHERE}: 'dedup_window' must be a number of seconds >= 0 (0: off), "
                f"got {self.dedup_window!r}"
            )


def _positive(name: str, value: Any, *, integer: bool = False) -> None:
    kinds: tuple[type[int] | type[float], ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        what = "a whole number of bytes" if integer else "a number of seconds"
        raise ConfigurationError(f"{_WHERE}: {name!r} must be {what} > 0, got {value!r}")


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
