"""A chord's header, sent in one transaction with its chord row.

Celery sends a chord as ``backend.apply_chord`` (pgbroker's writes the
chord row), then each task of the header in turn, calling
``backend.set_chord_size`` just before the last one: a commit for the row,
one per task, one for the size. When the result backend is pgbroker's, in
the broker's database and schema, and each part of the header is one task,
the backend opens a :class:`Header` here instead of writing (:func:`start`,
:func:`size_set`), and the transport keeps the header's publishes in it
instead of sending them (:func:`current`, :meth:`Header.takes`). The last
one (the first after the size) sends all of it in one pipelined
transaction on the transport's session: the chord row, every task, the
size; one commit and one round trip. A chord is then there whole or not at
all; until its last task is sent, none of it is visible.

Anything unexpected while a header is open (a message that is not the
header's, a broker in another database) sends what is held at once, as
Celery sent it, the chord row first, and the publish goes on as usual: the
chord is then sent as it was before this module. A header that Celery
stops sending (an error raised to the caller of ``apply_async``) is sent
as far as it got by the thread's next publish, and dropped by its next
chord or at the end of a task run (``process_cleanup``), unsent.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pgbroker.logs import recovery

logger = logging.getLogger("pgbroker.broker")

#: A statement of the result backend (composed in the shared schema) and
#: its parameters.
Statement = tuple[Any, dict[str, Any]]


@dataclass
class Header:
    group_id: str
    #: Server, database and schema of the result backend, given the
    #: broker's (finish.backend_origin: asked again when they differ).
    origin: Callable[[str], str | None]
    #: Runs the backend's statements on the backend's own connection: the
    #: way out when the broker is elsewhere.
    run_elsewhere: Callable[[list[Statement]], None]
    #: The chord row, then (once Celery sets it) the size.
    statements: list[Statement]
    #: Parameters of ``publish_routing``, one per task, in publish order.
    messages: list[dict[str, Any]] = field(default_factory=list)
    #: The size is set: the next task is the last.
    last_next: bool = False

    def takes(self, params: dict[str, Any], broker_fingerprint: Callable[[], str]) -> bool:
        """Whether the publish ``params`` is one of this header's tasks and
        can commit with it (the broker is in the backend's database)."""
        headers = params["headers"].obj
        group = headers.get("group") if isinstance(headers, dict) else None
        if group != self.group_id:
            return False
        broker = broker_fingerprint()
        return broker == self.origin(broker)


_local = threading.local()


def start(
    group_id: str,
    chord_row: Statement,
    origin: Callable[[str], str | None],
    run_elsewhere: Callable[[list[Statement]], None],
) -> None:
    """A chord is being sent from this thread: hold its row and its header."""
    discard()
    _local.header = Header(group_id, origin, run_elsewhere, [chord_row])


def size_set(group_id: str, statement: Statement) -> bool:
    """Hold the size of the open header ``group_id`` (True), or say there
    is no such header here (False: the caller writes it)."""
    header = current()
    if header is None or header.group_id != group_id or header.last_next:
        return False
    header.statements.append(statement)
    header.last_next = True
    return True


def current() -> Header | None:
    return getattr(_local, "header", None)


def close() -> None:
    """The open header has been sent: nothing is held any more."""
    _local.header = None


def discard() -> None:
    """Drop a header left open (its chord stopped being sent: Celery raised
    to the caller), unsent."""
    header = current()
    _local.header = None
    if header is not None:
        logger.warning(
            "chord %s: its header stopped being sent after %d of its tasks (an error "
            "was raised to the caller of apply_async): none of it was written",
            header.group_id,
            len(header.messages),
            extra=recovery("chord_header_dropped", count=len(header.messages)),
        )
