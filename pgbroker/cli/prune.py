"""``pgbroker prune`` and ``pgbroker metrics``: retention and monitoring.

Kept out of :mod:`pgbroker.cli.options` to keep that module a readable size; each
``add_*`` function adds one subcommand and is listed in ``pgbroker.cli.main.COMMANDS``.
The work is done by :mod:`pgbroker.operations.retention` and :mod:`pgbroker.operations.metrics`.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from pgbroker.cli import options as cli
from pgbroker.errors import ConfigurationError

if TYPE_CHECKING:
    # Imported when a command runs: pgbroker.operations.retention imports Celery.
    from pgbroker.operations.retention import Progress, PruneReport

# --- pgbroker prune -------------------------------------------------------------------


def add_prune(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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
    cli.add_database_options(parser)
    parser.add_argument(
        "--redeliveries-older-than",
        action=cli.Env,
        env="PGBROKER_PRUNE_REDELIVERIES_OLDER_THAN",
        metavar="AGE",
        default="7d",
        help="redelivery log entries older than this (default: 7d)",
    )
    parser.add_argument(
        "--dead-letters-older-than",
        action=cli.Env,
        env="PGBROKER_PRUNE_DEAD_LETTERS_OLDER_THAN",
        metavar="AGE",
        help="dead letters older than this; without it dead letters are kept "
        "(they are messages no one processed: see `pgbroker dead-letters list` first)",
    )
    parser.add_argument(
        "--results-older-than",
        action=cli.Env,
        env="PGBROKER_PRUNE_RESULTS_OLDER_THAN",
        metavar="AGE",
        help="task results, saved groups and chord counters last written before this "
        "(the result backend already expires them by result_expires on its own)",
    )
    parser.add_argument(
        "--durable-idle-older-than",
        action=cli.Env,
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
        action=cli.Env,
        env="PGBROKER_PRUNE_BATCH_SIZE",
        type=int,
        default=retention.BATCH_SIZE,
        metavar="N",
        help=f"rows per delete statement (default: {retention.BATCH_SIZE})",
    )
    cli.add_json(parser)
    parser.set_defaults(handler=_prune)


def _prune(args: argparse.Namespace) -> int:
    from pgbroker.operations import retention

    cli.positive(args.batch_size, "--batch-size")
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
    with cli.open_connection(args) as conn:
        report = retention.prune(
            conn,
            cli.schema_of(args),
            policy,
            dry_run=args.dry_run,
            batch_size=args.batch_size,
            progress=None if args.json else _progress(args.batch_size),
        )
        where = cli.admin.where(conn)
    if args.json:
        cli.print_json(report)
        return cli.EXIT_OK
    print(render_prune(report, where))
    return cli.EXIT_OK


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
            "-" if item.cutoff is None else cli.format_time(item.cutoff),
            str(item.matched),
            "-" if report.dry_run else str(item.deleted),
        ]
        for item in report.items
    ]
    table = cli.format_table(
        ["records", "older than", "matched", "deleted"], rows, right=frozenset({2, 3})
    )
    total = report.matched if report.dry_run else report.deleted
    summary = f"{verb} {cli.plural(total, 'row')} in schema {report.schema!r} on {where}"
    if report.dry_run:
        summary += " (dry run: nothing deleted)"
    return f"{table}\n{summary}"


# --- pgbroker metrics -----------------------------------------------------------------


def add_metrics(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from pgbroker.operations import metrics

    parser = commands.add_parser(
        "metrics",
        help="serve Prometheus metrics (queue depth, latency, throughput, redeliveries)",
        description=(
            "A Prometheus exporter: serves /metrics over HTTP; each scrape runs one "
            "query over the monitoring views (queue_stats, broker_stats, result_stats, "
            "table_sizes). The metrics are listed in docs/operations.md."
        ),
        epilog="exit status: 0 stopped (Ctrl-C), 2 error",
    )
    cli.add_database_options(parser)
    parser.add_argument(
        "--port",
        action=cli.Env,
        env="PGBROKER_METRICS_PORT",
        type=int,
        default=metrics.DEFAULT_PORT,
        metavar="PORT",
        help=f"port to listen on (default: {metrics.DEFAULT_PORT})",
    )
    parser.add_argument(
        "--addr",
        action=cli.Env,
        env="PGBROKER_METRICS_ADDR",
        default="0.0.0.0",
        metavar="ADDRESS",
        help="address to listen on (default: 0.0.0.0, every interface)",
    )
    parser.add_argument(
        "--all-queues",
        action="store_true",
        help="include Celery's internal queues (*.pidbox, celeryev.*), left out by default",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="print the metrics once to stdout and exit (for node_exporter's textfile "
        "collector, or to look)",
    )
    parser.set_defaults(handler=_metrics)


def _metrics(args: argparse.Namespace) -> int:
    from pgbroker.operations import metrics

    name = cli.schema_of(args)
    if args.once:
        with cli.open_connection(args) as conn:
            snap = metrics.snapshot(conn, name, all_queues=args.all_queues)
        sys.stdout.write(metrics.render(snap).decode())
        return cli.EXIT_OK
    if not 0 <= args.port <= 65535:
        raise ConfigurationError(f"--port must be 0 to 65535, got {args.port}")
    url = cli.require_url(args)
    with cli.open_connection(args) as conn:  # fail now, with a clear error, not at the first scrape
        metrics.snapshot(conn, name)
        where = cli.admin.where(conn)
    server, collector = metrics.serve(
        url, name, port=args.port, addr=args.addr, all_queues=args.all_queues
    )
    port = server.server_port
    print(
        f"pgbroker metrics: serving http://{args.addr}:{port}/metrics for schema {name!r} "
        f"on {where}",
        file=sys.stderr,
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    finally:
        server.shutdown()
        collector.close()
