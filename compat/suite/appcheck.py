"""Smoke check of a user's Celery app: routing and serialisation, no execution.

For every task the app registers (Celery's own ``celery.*`` tasks aside):

* where ``task_routes`` (and the task's own options) send it: queue,
  exchange, routing key, exactly as ``apply_async`` would compute them;
* that a sample message (placeholder arguments built from the task's
  signature) serialises with the task's serializer, that the result decodes
  with the app's ``accept_content`` (as a worker would decode it), and that
  its headers are JSON-serialisable (transports store them as JSON);
* warnings (not failures): a routed queue missing from an explicit
  ``task_queues`` (a worker needs ``-Q`` for it), and queues that share one
  direct binding (a ``Queue`` declared without ``routing_key`` gets the
  default one, so both queues receive every message).

Nothing is published and no task runs.
"""

from __future__ import annotations

import inspect
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from celery import Celery
from celery.app.utils import find_app
from kombu.serialization import dumps, loads, prepare_accept_content
from kombu.utils import json as kombu_json

OK, WARN, FAIL = "ok", "warn", "fail"

#: Placeholder values by annotation (also for string annotations).
_SAMPLES: dict[str, Any] = {
    "int": 1,
    "float": 1.5,
    "str": "text",
    "bytes": b"bytes",
    "bool": True,
    "list": [],
    "dict": {},
    "tuple": (),
    "Sequence": [],
    "Mapping": {},
}


@dataclass
class TaskCheck:
    task: str
    queue: str = ""
    exchange: str = ""
    routing_key: str = ""
    serializer: str = ""
    size: int = 0
    status: str = OK
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def load_app(spec: str) -> Celery:
    """``module:attribute`` or ``module`` (as ``celery -A`` takes it)."""
    app = find_app(spec)
    if not isinstance(app, Celery):
        raise TypeError(f"{spec} is {type(app).__name__}, not a Celery app")
    return app


def check_app(app: Celery) -> list[TaskCheck]:
    app.loader.import_default_modules()  # also runs autodiscover_tasks
    user_tasks = {name: task for name, task in app.tasks.items() if not name.startswith("celery.")}
    return [_check_task(app, name, user_tasks[name]) for name in sorted(user_tasks)]


def _check_task(app: Celery, name: str, task: Any) -> TaskCheck:
    check = TaskCheck(task=name)
    conf = app.conf
    try:
        args, kwargs = sample_arguments(task)
        options = dict(task._get_exec_options())
        route = app.amqp.router.route(options, name, args, kwargs, task_type=task)
        queue = route["queue"]
        if isinstance(queue, str):
            queue = app.amqp.queues[queue]
        check.queue = queue.name
        exchange = route.get("exchange") or queue.exchange
        check.exchange = getattr(exchange, "name", exchange) or "(default)"
        check.routing_key = route.get("routing_key") or queue.routing_key or ""
        check.serializer = route.get("serializer") or task.serializer or conf.task_serializer

        message = app.amqp.create_task_message(
            str(uuid.uuid4()), name, args, kwargs, **_message_options(route)
        )
        content_type, encoding, data = dumps(message.body, serializer=check.serializer)
        check.size = len(data)
        # Decoded as a worker decodes it: only accept_content is allowed.
        loads(data, content_type, encoding, accept=prepare_accept_content(conf.accept_content))
        kombu_json.dumps(message.headers)

        result_accept = conf.result_accept_content or conf.accept_content
        result_type = dumps(None, serializer=conf.result_serializer)[0]
        if result_type not in prepare_accept_content(result_accept):
            raise ValueError(
                f"result_serializer {conf.result_serializer!r} is not in "
                f"result_accept_content/accept_content {list(result_accept)}"
            )
        declared = {q.name for q in conf.task_queues or ()}
        if conf.task_queues and queue.name not in declared:
            check.status = WARN
            check.detail = (
                f"queue {queue.name!r} is not in task_queues: a worker consumes it "
                f"only with -Q {queue.name}"
            )
        # A Queue declared without routing_key gets the default one, so two
        # queues can share a binding and both receive every message.
        shared = sorted(
            q.name
            for q in app.amqp.queues.values()
            if q.name != queue.name
            and q.exchange is not None
            and q.exchange.name == check.exchange
            and q.exchange.type == "direct"
            and q.routing_key == check.routing_key
        )
        if shared:
            check.status = WARN
            check.detail = (
                f"queues {[queue.name, *shared]} are all bound to exchange {check.exchange!r} "
                f"with routing key {check.routing_key!r}: each message goes to all of them"
            )
    except Exception as exc:
        check.status = FAIL
        check.detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return check


def _message_options(route: dict[str, Any]) -> dict[str, Any]:
    keep = ("time_limit", "soft_time_limit", "expires", "shadow")
    return {key: route[key] for key in keep if route.get(key) is not None}


def sample_arguments(task: Any) -> tuple[list[Any], dict[str, Any]]:
    """Placeholder values for the task's required parameters."""
    try:
        signature = inspect.signature(task.run)
    except (TypeError, ValueError):
        return [], {}
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for param in signature.parameters.values():
        if param.default is not inspect.Parameter.empty:
            continue
        value = _sample(param.annotation)
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            args.append(value)
        elif param.kind is param.KEYWORD_ONLY:
            kwargs[param.name] = value
    return args, kwargs


def _sample(annotation: Any) -> Any:
    if annotation is inspect.Parameter.empty:
        return None
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    base = text.split("[", 1)[0].split(".")[-1].strip()
    return _SAMPLES.get(base)


def render_checks(checks: list[TaskCheck]) -> str:
    headers = ["task", "queue", "exchange", "routing key", "serializer", "bytes", "check"]
    rows = [
        [
            c.task,
            c.queue,
            c.exchange,
            c.routing_key,
            c.serializer,
            str(c.size),
            c.status if c.status == OK else f"{c.status.upper()}: {c.detail}",
        ]
        for c in checks
    ]
    if not rows:
        return "(the app registers no task of its own)"
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join([*out, *(line(row) for row in rows)])
