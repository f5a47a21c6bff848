"""One transaction to finish a task: its result, its hand-off and its ack.

When a Celery task run ends, Celery's worker sends the next link of the
task's chain (``_dispatch_callbacks_and_chain``), then stores the result
(``mark_as_done``), then acknowledges the task's message (with
``acks_late``). Three commits, and a crash between them leaves a chain
half handed over: the next link sent but the result not stored, or the
message delivered again and the link sent twice.

When pgbroker's result backend shares the broker's database and schema,
the three commit together instead (docs/delivery.md, "What commits
together"):

* The transport does not send the next link of a chain at once: it holds
  the publish statement's parameters here (:func:`hold`), for the task run
  that publishes it, in this thread.
* The backend's ``mark_as_done`` or ``mark_as_failure`` for that run
  (:func:`take`) runs them in the transaction that stores the result, with
  ``finish_ack`` (:file:`sql/queries.sql`), which removes the run's own
  message if this delivery still holds it: its consumer holds it, or its
  consumer's session was lost and nobody has had the message since (back
  in its queue, its delivery count not grown: as ``ack_orphaned``).
* If another delivery has had it since (claimed by another consumer after
  this delivery's session was lost), the whole transaction rolls back: the
  delivery that holds the message now finishes the task. So the next link
  is stored exactly once per finished run of the message, by construction.

Messages a task body sends while it runs (``other.delay()``), and the
callbacks Celery sends as it succeeds, go out when called, as always,
unless the task opts into its **outbox** (``pgbroker_outbox = True`` on the
task or in the app's config): then they are held too (``Held.outbox``),
commit with the run's success, and are dropped if it fails or retries
(:func:`unfinished`): sent only if the task's result commits. A message
with the run's own task id (``Task.retry``, ``Task.replace``) and a chord
sent from the body are never held. Held messages that no finish takes (a
run that ends without storing an outcome: ``Ignore``, ``Reject``, a
replaced task) are sent the usual way when the run ends (:func:`release`,
from the backend's ``process_cleanup``, which Celery's worker calls after
every run).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pgbroker.broker.messages import (
    CONSUMER_ID,
    DELIVERY_COUNT,
    ORIGIN,
    PUBLISHED_AT,
    TIMELINE,
)
from pgbroker.logs import recovery
from pgbroker.options import flag

logger = logging.getLogger("pgbroker.broker")


class Finisher(Protocol):
    """A result backend that can finish a task in one transaction (pgbroker's)."""

    def database_fingerprint(self) -> str | None:
        """Server, database and schema of its connections (``database_fingerprint``
        in sql/enqueue.sql), or None when it cannot tell."""
        ...


@dataclass
class Held:
    """What a task run's finish commits besides its result."""

    task_id: str
    #: The delivered message: its id, the consumer that holds it, its
    #: delivery count with this delivery, and when it was published (ISO
    #: 8601; with the id, it names the message for good).
    message_id: int
    consumer_id: int
    delivery_count: int
    published_at: str
    #: The server's timeline when the message was claimed (TIMELINE): on
    #: another one, the finish writes nothing.
    timeline: int | None
    #: The task acknowledges after its run: until the finish, this delivery
    #: holds the message.
    acks_late: bool
    #: The next link of the chain: (transport, parameters of
    #: ``publish_routing``), in publish order.
    messages: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)
    #: What the task body and its callbacks sent, when the task opts into
    #: its outbox: the same, sent only with the run's success.
    outbox: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)

    def all_messages(self) -> list[tuple[Any, dict[str, Any]]]:
        """Everything held, in the order the run sent it (a body's messages
        come before the next link, which Celery sends as the run ends)."""
        return self.outbox + self.messages


#: Backends that finish tasks in one transaction: their fingerprint (None
#: until asked) and when it was asked (time.monotonic()).
_finishers: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()

#: Seconds after which a backend's fingerprint that differs from the one
#: expected (a delivery's origin, the transport's own) is asked again: the
#: server restarted or failed over since (its start time is part of it), or
#: could not be asked. Without asking again, one-transaction finishes would
#: stop for the rest of the process; asking at every task would cost a
#: statement per task when the backend really is elsewhere.
ASK_AGAIN_AFTER = 10.0

_local = threading.local()


def offer(backend: Finisher) -> None:
    """Called by a result backend that can finish tasks in one transaction."""
    _finishers.setdefault(backend, [None, 0.0])


def backend_origin(backend: Finisher, expected: str | None = None) -> str | None:
    """Server, database and schema of a backend that offered to finish
    tasks ("" when it cannot tell); None for any other. Asked once, and
    again when it differs from ``expected`` (see ASK_AGAIN_AFTER)."""
    known = _finishers.get(backend)
    if known is None:
        return None
    now = time.monotonic()
    if known[0] is None or (
        expected is not None and known[0] != expected and now - known[1] >= ASK_AGAIN_AFTER
    ):
        known[0] = backend.database_fingerprint() or ""
        known[1] = now
    return str(known[0])


def hold(transport: Any, params: dict[str, Any], broker_fingerprint: Callable[[], str]) -> bool:
    """Hold the publish ``params`` (a Celery task message) for the finish of
    the current task run if they are the next link of its chain, or if the
    task opts into its outbox and they are not the run's own task (a retry,
    a replacement), and its backend finishes it; True if held (the caller
    sends nothing now)."""
    state = sys.modules.get("celery._state")
    if state is None or params["task_id"] is None:
        return False
    task = state.get_current_worker_task()
    request = getattr(task, "request", None)
    if request is None:
        return False
    if _is_next_link(request, params):
        into = "messages"
    elif (
        params["task_id"] != request.id
        and request.id not in getattr(_local, "closed", ())
        and outbox_on(task)
    ):
        into = "outbox"
    else:
        return False
    finishable = _finishable(task, request)
    if finishable is None or finishable.origin != broker_fingerprint():
        return False  # results or the message elsewhere: today's path
    held: Held | None = getattr(_local, "held", None)
    if held is None or held.task_id != request.id:
        release()
        held = _local.held = finishable.held
    getattr(held, into).append((transport, params))
    return True


def outbox_on(task: Any) -> bool:
    """Whether ``task`` sends what its body sends only with its success:
    its own ``pgbroker_outbox`` attribute (``@app.task(pgbroker_outbox=True)``),
    else the app's ``pgbroker_outbox`` setting (default False)."""
    value = getattr(task, "pgbroker_outbox", None)
    if value is None:
        app = getattr(task, "app", None)
        value = app.conf.get("pgbroker_outbox", False) if app is not None else False
    return flag("", "pgbroker_outbox", value)


def own_message(task_id: str | None) -> Held | None:
    """For the finish of a successful ``acks_late`` run of ``task_id`` that
    held nothing: its message, to acknowledge with its result, if it came
    from the database and schema of its backend (else None)."""
    state = sys.modules.get("celery._state")
    task = state.get_current_worker_task() if state is not None else None
    request = getattr(task, "request", None)
    if request is None or request.id != task_id or not getattr(task, "acks_late", False):
        return None
    finishable = _finishable(task, request)
    return finishable.held if finishable is not None else None


@dataclass
class _Finishable:
    held: Held
    #: Where the run's message came from (ORIGIN): its backend's database.
    origin: str


def _finishable(task: Any, request: Any) -> _Finishable | None:
    """The run of ``request`` can finish in one transaction: its message
    came from a pgbroker consumer, and its backend is pgbroker's, in the
    same database and schema."""
    props = getattr(request, "properties", None)
    if not isinstance(props, dict):
        return None
    message_id, consumer_id = props.get("delivery_tag"), props.get(CONSUMER_ID)
    delivery_count, origin = props.get(DELIVERY_COUNT), props.get(ORIGIN)
    published_at = props.get(PUBLISHED_AT)
    if not (
        isinstance(message_id, int)
        and isinstance(consumer_id, int)
        and isinstance(delivery_count, int)
        and isinstance(published_at, str)
        and origin
    ):
        return None
    backend: Finisher | None = getattr(task, "backend", None)
    if backend is None or backend_origin(backend, origin) != origin:
        return None
    acks_late = bool(getattr(task, "acks_late", False))
    timeline = props.get(TIMELINE)
    held = Held(
        request.id, message_id, consumer_id, delivery_count, published_at, timeline, acks_late
    )
    return _Finishable(held, origin)


def _is_next_link(request: Any, params: dict[str, Any]) -> bool:
    """Whether ``params`` publish the next link of the chain of ``request``
    (Celery sends ``chain[-1]``, frozen with its task id, as its child)."""
    noted = getattr(_local, "next_link", None)
    if noted is not None and noted == (request.id, params["task_id"]):
        return True  # Celery 5.5 (note_next_link)
    link = _last_link_id(request)
    return link is not None and link == params["task_id"]


def _last_link_id(request: Any) -> Any:
    """The task id of the last signature in ``request.chain`` (the next link)."""
    chain = getattr(request, "chain", None)
    options = chain[-1].get("options") if chain and isinstance(chain[-1], dict) else None
    return options.get("task_id") if isinstance(options, dict) else None


def note_next_link(task: Any = None, **_: Any) -> None:
    """``task_prerun`` receiver, connected on Celery 5.5 only: 5.5 pops the
    next link off ``request.chain`` before it publishes it (5.6 and later
    leave the chain as it is), so it is noted as the run starts."""
    request = getattr(task, "request", None)
    link = _last_link_id(request)
    _local.next_link = (request.id, link) if request is not None and link is not None else None


def take(task_id: str | None) -> Held | None:
    """What the finish of ``task_id`` must commit besides the result, if
    anything was held for it in this thread (then it is no longer held).
    The run's outbox closes: what it sends from now on (a chord's body as
    its last part returns, Celery's errbacks) goes out when sent."""
    if task_id is not None:
        _local.closed = {*getattr(_local, "closed", ()), task_id}
    held: Held | None = getattr(_local, "held", None)
    if held is None or task_id is None or held.task_id != task_id:
        return None
    _local.held = None
    return held


def release() -> None:
    """Send what is still held in this thread the usual way: its run ended
    without a finish taking it (nothing a task sends may be left unsent)."""
    held: Held | None = getattr(_local, "held", None)
    _local.held = None
    _local.closed = set()  # the run is over (a retry's next run has its task id)
    if held is None:
        return
    logger.info(
        "task %s ended without storing its outcome: sending its %d held message(s) now",
        held.task_id,
        len(held.all_messages()),
        extra=recovery("finish_released", task_id=held.task_id, count=len(held.all_messages())),
    )
    send_separately(held)


def unfinished(run: str | Held, outcome: str) -> None:
    """The run (its task id, or what was taken for its finish) did not
    succeed (``outcome``: "failed", "retries"): what its outbox holds is
    not sent, and a next link held for it goes out the usual way."""
    held = take(run) if isinstance(run, str) else run
    if held is None:
        return
    if held.outbox:
        logger.info(
            "task %s %s: the %d message(s) its body sent through its outbox are not sent",
            held.task_id,
            outcome,
            len(held.outbox),
            extra=recovery(
                "outbox_dropped", task_id=held.task_id, reason=outcome, count=len(held.outbox)
            ),
        )
        held.outbox = []
    send_separately(held)


def send_separately(held: Held) -> None:
    """Publish held messages on their transports' sessions, as without a finish."""
    for transport, params in held.all_messages():
        transport.run("publish_routing", **params)
