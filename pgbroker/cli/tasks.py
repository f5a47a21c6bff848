"""``pgbroker tasks`` and ``pgbroker tasks show TASK_ID``: stored task results."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from typing import Any

from pgbroker.cli.options import (
    EXIT_OK,
    add_database_options,
    add_json,
    format_ago,
    format_table,
    format_time,
    json_default,
    open_connection,
    plural,
    positive,
    print_json,
    schema_of,
)
from pgbroker.errors import ConfigurationError
from pgbroker.operations import admin


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = commands.add_parser(
        "tasks",
        help="stored task results; `tasks show ID` for one task",
        description=(
            "List the results stored by pgbroker's result backend (task_result), most "
            "recently changed first; `pgbroker tasks show TASK_ID` shows one task's result "
            "with its messages, dead letters and redeliveries. Task names, args, worker "
            "and queue are stored only when the app sets result_extended=True."
        ),
    )
    add_database_options(parser)
    parser.add_argument("show", nargs="?", choices=["show"], help="show one task")
    parser.add_argument("task_id", nargs="?", metavar="TASK_ID", help="the task to show")
    parser.add_argument("--name", metavar="N", help="task name; * is a wildcard (billing.*)")
    parser.add_argument("--state", metavar="S", help="SUCCESS, FAILURE, STARTED, RETRY...")
    parser.add_argument(
        "--since", metavar="DURATION", help="changed within DURATION: 90s, 15m, 1h, 2d"
    )
    parser.add_argument("--limit", type=int, default=50, metavar="N", help="at most N (default 50)")
    add_json(parser)
    parser.set_defaults(handler=_tasks)


def _tasks(args: argparse.Namespace) -> int:
    if args.show and not args.task_id:
        raise ConfigurationError("`pgbroker tasks show` needs a TASK_ID")
    if args.show:
        return _task_show(args)
    if args.task_id:
        raise ConfigurationError(
            f"unexpected {args.task_id!r}: did you mean `tasks show {args.task_id}`?"
        )
    positive(args.limit, "--limit")
    since = None
    if args.since:
        try:
            since = admin.parse_duration(args.since)
        except ValueError as exc:
            raise ConfigurationError(f"--since: {exc}") from None
    with open_connection(args) as conn:
        page = admin.list_tasks(
            conn,
            schema_of(args),
            name=args.name,
            state=args.state,
            since=since,
            limit=args.limit,
        )
    if args.json:
        print_json(page)
        return EXIT_OK
    if not page.items:
        print(
            "no stored results match" if args.name or args.state or since else "no stored results"
        )
        return EXIT_OK
    now = datetime.now(timezone.utc)
    rows = [
        [
            t.task_id,
            t.name or "-",
            t.state,
            t.worker or "-",
            t.queue or "-",
            "-" if t.retries is None else str(t.retries),
            format_ago(t.updated_at, now),
        ]
        for t in page.items
    ]
    print(
        format_table(
            ["TASK ID", "NAME", "STATE", "WORKER", "QUEUE", "RETRIES", "UPDATED"],
            rows,
            frozenset({5}),
        )
    )
    if page.total > len(page.items):
        print(f"({len(page.items)} most recent of {page.total}: --limit to see more)")
    return EXIT_OK


def _task_show(args: argparse.Namespace) -> int:
    with open_connection(args) as conn:
        detail = admin.show_task(conn, schema_of(args), args.task_id)
    if args.json:
        print_json(detail)
    else:
        print(render_task(detail))
    return EXIT_OK


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=json_default)


def render_task(detail: admin.TaskDetail) -> str:
    out = [f"task {detail.task_id}"]
    r = detail.result
    if r is None:
        out.append("  result:    none stored (PENDING, or results are kept elsewhere)")
    else:
        fields = [
            ("state", r.state),
            ("name", r.name),
            ("worker", r.worker),
            ("queue", r.queue),
            ("retries", r.retries),
            ("args", None if r.args is None else _value(r.args)),
            ("kwargs", None if r.kwargs is None else _value(r.kwargs)),
            ("result", _value(r.result)),
            ("parent", r.parent_id),
            ("root", r.root_id),
            ("group", r.group_id),
            ("children", None if not r.children else _value(r.children)),
            ("created", format_time(r.created_at)),
            ("received", None if r.received_at is None else format_time(r.received_at)),
            ("started", None if r.started_at is None else format_time(r.started_at)),
            ("updated", format_time(r.updated_at)),
            ("done", None if r.date_done is None else format_time(r.date_done)),
        ]
        out += [f"  {k + ':':<10} {v}" for k, v in fields if v is not None]
        if r.retry_log:
            out.append("  retried:")
            out += [
                f"    {'?' if e.at is None else format_time(e.at)}  run {n}: {e.reason or ''}"
                for n, e in enumerate(r.retry_log, 1)
            ]
        if r.traceback:
            out.append("  traceback:")
            out += ["    " + line for line in r.traceback.rstrip().splitlines()]
    out.append(f"messages ({len(detail.messages)}):")
    for m in detail.messages:
        holder = f" by consumer {m.consumer_id}" if m.consumer_id is not None else ""
        out.append(
            f"  #{m.id} queue {m.queue!r}: {m.state}{holder}, priority {m.priority}, "
            f"delivered {plural(m.delivery_count, 'time')}, published {format_time(m.published_at)}"
            + (f", eta {m.headers['eta']}" if m.headers.get("eta") else "")
        )
    out.append(f"dead letters ({len(detail.dead_letters)}):")
    for d in detail.dead_letters:
        where = (
            f"queue {d.queue!r}"
            if d.queue is not None
            else f"exchange {d.exchange!r} key {d.routing_key!r}"
        )
        out.append(
            f"  #{d.id} {d.reason} ({where}) at {format_time(d.died_at)}, "
            f"delivered {plural(d.delivery_count, 'time')}: `pgbroker dead-letters replay {d.id}`"
        )
    out.append(f"redeliveries ({len(detail.redeliveries)}):")
    for x in detail.redeliveries:
        by = f" of consumer {x.consumer_id}" if x.consumer_id is not None else ""
        out.append(
            f"  {format_time(x.at)} {x.reason}{by}: message #{x.message_id} back to queue "
            f"{x.queue!r} after delivery {x.delivery_count}"
        )
    return "\n".join(out)
