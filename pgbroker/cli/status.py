"""``pgbroker status``: queues, consumers and recent activity.

:func:`render_status` and :func:`rates` also draw ``pgbroker top``'s frames.
"""

from __future__ import annotations

import argparse
import dataclasses

from pgbroker.cli.options import (
    EXIT_OK,
    add_database_options,
    add_json,
    format_age,
    format_ago,
    format_table,
    format_time,
    open_connection,
    plural,
    print_json,
    schema_of,
)
from pgbroker.operations import admin

ACTIVITY_HELP = (
    "What is shown: per queue, ready, reserved (claimed, not yet acked), delayed and "
    "dead-lettered messages and the age of the oldest ready one; consumers (alive = "
    "its session holds its advisory lock; a dead one is cleared by the next sweep); "
    "results completed per period (task_result.date_done, when the pgbroker result "
    "backend is used), redeliveries and dead letters in the last hour. Acked messages "
    "are deleted, so no acknowledgement rate is recorded; `pgbroker top` derives "
    "stored and removed messages per second from two samples."
)


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = commands.add_parser(
        "status",
        help="queues, consumers and recent activity",
        description="Show queues, consumers and recent activity. " + ACTIVITY_HELP,
    )
    add_database_options(parser)
    add_status_options(parser)
    parser.set_defaults(handler=_status)


def add_status_options(parser: argparse.ArgumentParser) -> None:
    add_json(parser)
    parser.add_argument(
        "--all-queues",
        action="store_true",
        help="also show Celery's remote-control and event queues (*.pidbox, celeryev.*)",
    )


def _status(args: argparse.Namespace) -> int:
    with open_connection(args) as conn:
        status = admin.status(conn, schema_of(args), all_queues=args.all_queues)
    if args.json:
        print_json(status)
    else:
        print(render_status(status, "pgbroker status"))
    return EXIT_OK


@dataclasses.dataclass
class Rates:
    """Messages per second between two status samples."""

    seconds: float
    stored: float
    #: Left the message table: acked, rejected, expired, purged or deleted.
    removed: float


def rates(before: admin.Status, after: admin.Status) -> Rates | None:
    seconds = (after.at - before.at).total_seconds()
    if seconds <= 0:
        return None
    a, b = before.activity, after.activity
    stored = (b.messages_stored_total or 0) - (a.messages_stored_total or 0)
    removed = stored - (b.messages_present - a.messages_present)
    return Rates(seconds=seconds, stored=stored / seconds, removed=max(0, removed) / seconds)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def render_status(status: admin.Status, title: str, speed: Rates | None = None) -> str:
    out = [
        f"{title}: schema {status.schema!r} in {status.database} at {format_time(status.at)}",
        "",
    ]
    rows = [
        [
            q.name + ("" if q.declared else " (deleted)"),
            str(q.ready),
            str(q.reserved),
            str(q.delayed),
            str(q.dead_lettered),
            format_age(q.oldest_ready_age),
            str(q.consumers),
        ]
        if q.name is not None
        else ["(no queue)", "-", "-", "-", str(q.dead_lettered), "-", "-"]
        for q in status.queues
    ]
    if rows:
        header = ["QUEUE", "READY", "RESERVED", "DELAYED", "DEAD", "OLDEST READY", "CONSUMERS"]
        out.append(format_table(header, rows, frozenset(range(1, 7))))
    else:
        out.append("no queues")
    if status.hidden_queues:
        out.append(
            f"({plural(status.hidden_queues, 'Celery pidbox/event queue')} not shown: --all-queues)"
        )
    out.append("")
    rows = [
        [
            str(c.id),
            c.hostname,
            str(c.pid),
            f"{format_time(c.started_at)} ({format_ago(c.started_at, status.at)})",
            "yes" if c.alive else "NO (session gone; the next sweep requeues its messages)",
            str(c.reserved),
            ", ".join(c.queues) or "-",
        ]
        for c in status.consumers
    ]
    if rows:
        header = ["CONSUMER", "HOST", "PID", "STARTED", "ALIVE", "RESERVED", "QUEUES"]
        out.append(format_table(header, rows, frozenset({0, 2, 5})))
    else:
        out.append("no consumers")
    out += ["", "activity:"]
    act = status.activity
    if act.results is None:
        out.append("  results completed: unknown (no task_result table)")
    else:
        r = act.results
        states = f" ({_counts(r.by_state_last_hour)})" if r.by_state_last_hour else ""
        out.append(
            f"  results completed (task_result.date_done): {r.last_minute} in the last "
            f"minute, {r.last_5_minutes} in 5 minutes, {r.last_hour} in the last hour{states}"
        )
    reasons = f" ({_counts(act.redeliveries_by_reason)})" if act.redeliveries_by_reason else ""
    out.append(f"  redeliveries in the last hour: {act.redeliveries_last_hour}{reasons}")
    out.append(f"  dead-lettered in the last hour: {act.dead_lettered_last_hour}")
    if speed is None:
        out.append(
            "  acked messages are deleted and not counted: `pgbroker top` shows "
            "messages stored and removed per second"
        )
    else:
        out.append(
            f"  messages stored: {speed.stored:.1f}/s, removed (acked, rejected, expired "
            f"or purged): {speed.removed:.1f}/s, over the last {speed.seconds:.1f} s"
        )
    return "\n".join(out)
