"""``pgbroker prune``: delete old history (redeliveries, dead letters, results, durable steps).

The work is done by :mod:`pgbroker.operations.retention`.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from pgbroker.cli.options import (
    EXIT_OK,
    Env,
    add_database_options,
    add_json,
    format_table,
    format_time,
    open_connection,
    plural,
    positive,
    print_json,
    schema_of,
)
from pgbroker.operations import admin

if TYPE_CHECKING:
    # Imported when a command runs: pgbroker.operations.retention imports Celery.
    from pgbroker.operations.retention import Progress, PruneReport


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from pgbroker.operations import retention

    parser = commands.add_parser(
        "prune",
        help="delete old history: redelivery log, dead letters, results, durable steps",
        description=(
            "Delete history pgbroker keeps for people to read, oldest first, in batches "
            "of one short transaction each. Messages themselves need no pruning (an ack "
            "deletes its message). Ages are durations: 90s, 15m, 12h, 7d, 2w; 'never' "
            "keeps those records. Run it from cron, or schedule the pgbroker.prune task "
            "with celery beat (docs/operations.md)."
        ),
        epilog="exit status: 0 done, 2 error",
    )
    add_database_options(parser)
    parser.add_argument(
        "--redeliveries-older-than",
        action=Env,
        env="PGBROKER_PRUNE_REDELIVERIES_OLDER_THAN",
        metavar="AGE",
        default="7d",
        help="redelivery log entries older than this (default: 7d)",
    )
    parser.add_argument(
        "--dead-letters-older-than",
        action=Env,
        env="PGBROKER_PRUNE_DEAD_LETTERS_OLDER_THAN",
        metavar="AGE",
        help="dead letters older than this; without it dead letters are kept "
        "(they are messages no one processed: see `pgbroker dead-letters list` first)",
    )
    parser.add_argument(
        "--results-older-than",
        action=Env,
        env="PGBROKER_PRUNE_RESULTS_OLDER_THAN",
        metavar="AGE",
        help="task results, saved groups and chord counters last written before this "
        "(the result backend already expires them by result_expires on its own)",
    )
    parser.add_argument(
        "--durable-idle-older-than",
        action=Env,
        env="PGBROKER_PRUNE_DURABLE_IDLE_OLDER_THAN",
        metavar="AGE",
        help="durable steps of tasks none of whose steps changed for this long "
        "(failed or abandoned tasks, which can no longer resume), and durable events "
        "sent, waits given up on and dead runs older than this. Steps of succeeded "
        "tasks past their keep time are always pruned",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="count what would be deleted; delete nothing"
    )
    parser.add_argument(
        "--batch-size",
        action=Env,
        env="PGBROKER_PRUNE_BATCH_SIZE",
        type=int,
        default=retention.BATCH_SIZE,
        metavar="N",
        help=f"rows per delete statement (default: {retention.BATCH_SIZE})",
    )
    add_json(parser)
    parser.set_defaults(handler=_prune)


def _prune(args: argparse.Namespace) -> int:
    from pgbroker.operations import retention

    positive(args.batch_size, "--batch-size")
    policy = retention.Policy(
        redeliveries_older_than=retention.age(
            args.redeliveries_older_than, "--redeliveries-older-than"
        ),
        dead_letters_older_than=retention.age(
            args.dead_letters_older_than, "--dead-letters-older-than"
        ),
        results_older_than=retention.age(args.results_older_than, "--results-older-than"),
        durable_idle_older_than=retention.age(
            args.durable_idle_older_than, "--durable-idle-older-than"
        ),
    )
    with open_connection(args) as conn:
        report = retention.prune(
            conn,
            schema_of(args),
            policy,
            dry_run=args.dry_run,
            batch_size=args.batch_size,
            progress=None if args.json else _progress(args.batch_size),
        )
        where = admin.where(conn)
    if args.json:
        print_json(report)
        return EXIT_OK
    print(render_prune(report, where))
    return EXIT_OK


def _progress(batch_size: int) -> Progress:
    tty = sys.stderr.isatty()

    def show(target: str, done: int, total: int) -> None:
        if total > batch_size:  # only worth showing when it takes several steps
            end = "\n" if (not tty or done >= total) else ""
            prefix = "\r" if tty else ""
            print(
                f"{prefix}{target}: deleted {done} of {total}", end=end, file=sys.stderr, flush=True
            )

    return show


def render_prune(report: PruneReport, where: str) -> str:
    verb = "would delete" if report.dry_run else "deleted"
    rows = [
        [
            item.target,
            "-" if item.cutoff is None else format_time(item.cutoff),
            str(item.matched),
            "-" if report.dry_run else str(item.deleted),
        ]
        for item in report.items
    ]
    table = format_table(
        ["records", "older than", "matched", "deleted"], rows, right=frozenset({2, 3})
    )
    total = report.matched if report.dry_run else report.deleted
    summary = f"{verb} {plural(total, 'row')} in schema {report.schema!r} on {where}"
    if report.dry_run:
        summary += " (dry run: nothing deleted)"
    return f"{table}\n{summary}"
