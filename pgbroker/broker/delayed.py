"""Delayed delivery (Celery's ``eta``) for the transport's consumer.

A message published with a future ``eta`` stays 'delayed' in PostgreSQL.
Each consumer keeps the earliest due time of its queues (learned at attach,
from NOTIFYs on ``due_channel`` and from each sweep and promotion), one
event-loop timer for it, and promotes the due messages then: idle consumers
send no extra query (docs/delivery.md).
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any

from pgbroker.broker.sweeper import PROMOTE_BATCH


class DelayedDelivery:
    """The delayed messages of a transport's queues (a mixin of
    :class:`pgbroker.broker.transport.Transport`, whose state it uses)."""

    # The monotonic time when the earliest delayed message known in our
    # queues is due (None: none known), and the server's clock minus ours.
    _due_at: float | None
    _clock_offset: float
    _due_tref: Any  # the event loop's timer for _due_at
    _due_armed: float | None
    _attached: set[str]
    _loop: Any
    consumer_id: int | None
    channel_name: str

    if TYPE_CHECKING:

        def run(self, query: str, /, **params: Any) -> Any: ...

        def _on_due_timer(self) -> None: ...

    def _learn_due(self, due: float | None, server_now: float | None = None) -> None:
        """Note that a delayed message in our queues is due at ``due``
        (server epoch); ``server_now``, when given, re-reads the server's
        clock (so that server and local clocks need not agree)."""
        if server_now is not None:
            self._clock_offset = server_now - time.time()
        if due is None:
            return
        at = time.monotonic() + (due - self._clock_offset - time.time())
        if self._due_at is None or at < self._due_at:
            self._due_at = at

    def promote(self) -> int:
        """Make the due delayed messages of our queues ready (their queues
        are NOTIFYed, which marks ours ready); learn when the next is due."""
        self._due_at = None
        if not self._attached:
            return 0
        row = self.run(
            "promote",
            queues=sorted(self._attached),
            limit=PROMOTE_BATCH,
            channel=self.channel_name,
        )
        promoted = int(row[0])
        self._learn_due(row[2], row[3])
        if promoted >= PROMOTE_BATCH:
            self._due_at = time.monotonic()  # more are due: promote again now
        return promoted

    def maybe_promote(self) -> None:
        if (
            self._due_at is not None
            and self.consumer_id is not None
            and time.monotonic() >= self._due_at
        ):
            self.promote()

    def _arm_due_timer(self) -> bool:
        """Keep the event loop's timer at ``_due_at``; True if it moved."""
        loop = self._loop
        if loop is None or self._due_at == self._due_armed:
            return False
        if self._due_tref is not None:
            self._due_tref.cancel()
            self._due_tref = None
        self._due_armed = self._due_at
        if self._due_at is not None:
            delay = max(self._due_at - time.monotonic(), 0.0)
            self._due_tref = loop.call_later(delay, self._on_due_timer)
        return True


def due_channel_for(schema: str) -> str:
    """The NOTIFY channel announcing delayed messages of ``schema``."""
    return "pgbd_" + hashlib.md5(schema.encode(), usedforsecurity=False).hexdigest()
