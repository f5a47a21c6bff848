"""Structured fields for the log records of recovery actions.

Each package area logs to one named logger, a child of ``pgbroker``:
``pgbroker.broker``, ``pgbroker.results``, ``pgbroker.durable``,
``pgbroker.database``, ``pgbroker.operations``. A record that reports a
recovery action (a session lost and retried, a run resumed from its
checkpoint, a step retried, a message requeued or dead-lettered) carries
the fields of :func:`recovery` as attributes, so a JSON formatter or a log
shipper can index them: ``pgbroker_action`` always, and ``task_id``,
``queue``, ``consumer``, ``reason``, ``count`` where known.
"""

from __future__ import annotations

from typing import Any


def recovery(action: str, **fields: Any) -> dict[str, Any]:
    """The ``extra=`` of a recovery action's log record; fields that are
    None are left out."""
    return {"pgbroker_action": action, **{k: v for k, v in fields.items() if v is not None}}
