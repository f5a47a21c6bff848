"""Every transport option, with its default, in one place.

Set them in Celery's ``broker_transport_options`` (or Kombu's
``Connection(transport_options=...)``)::

    broker_transport_options = {"schema": "jobs", "sweep_interval": 5}

An unknown option is an error, so a typo does not pass silently.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from pgbroker.errors import ConfigurationError

MiB = 1024 * 1024


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

    @classmethod
    def from_mapping(cls, given: dict[str, Any]) -> TransportOptions:
        known = {f.name: f for f in dataclasses.fields(cls)}
        for name in given:
            if name in known:
                continue
            if name in NOT_NEEDED:
                raise ConfigurationError(
                    f"broker_transport_options: {name!r} {NOT_NEEDED[name]}; remove it"
                )
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigurationError(
                f"broker_transport_options: unknown option {name!r}.{hint} "
                f"pgbroker takes: {', '.join(sorted(known))} (see pgbroker.options)."
            )
        options = cls(**given)
        if not options.schema or len(options.schema.encode()) > 63:
            raise ConfigurationError(
                "broker_transport_options: 'schema' must be 1 to 63 bytes long"
            )
        if options.sweep_interval <= 0:
            raise ConfigurationError("broker_transport_options: 'sweep_interval' must be > 0")
        return options


#: Options other transports take that pgbroker does not need.
NOT_NEEDED = {
    "visibility_timeout": (
        "is a Redis/SQS option: pgbroker hands back a dead consumer's messages "
        "within one sweep_interval and never steals them from a live one"
    ),
    "unacked_restore_interval": "is a Redis option: see sweep_interval",
    "fanout_prefix": "is a Redis option: pgbroker keeps bindings in PostgreSQL",
    "fanout_patterns": "is a Redis option: pgbroker keeps bindings in PostgreSQL",
    "priority_steps": "is a Redis option: pgbroker supports priorities 0-9 natively",
    "sep": "is a Redis option",
    "queue_order_strategy": "is a Redis option: pgbroker serves by priority, then FIFO",
}
