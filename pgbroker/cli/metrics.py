"""``pgbroker metrics``: a Prometheus exporter over the monitoring views.

The work is done by :mod:`pgbroker.operations.metrics`.
"""

from __future__ import annotations

import argparse
import sys
import time

from pgbroker.cli.options import (
    EXIT_OK,
    Env,
    add_database_options,
    open_connection,
    require_url,
    schema_of,
)
from pgbroker.errors import ConfigurationError
from pgbroker.operations import admin


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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
    add_database_options(parser)
    parser.add_argument(
        "--port",
        action=Env,
        env="PGBROKER_METRICS_PORT",
        type=int,
        default=metrics.DEFAULT_PORT,
        metavar="PORT",
        help=f"port to listen on (default: {metrics.DEFAULT_PORT})",
    )
    parser.add_argument(
        "--addr",
        action=Env,
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

    name = schema_of(args)
    if args.once:
        with open_connection(args) as conn:
            snap = metrics.snapshot(conn, name, all_queues=args.all_queues)
        sys.stdout.write(metrics.render(snap).decode())
        return EXIT_OK
    if not 0 <= args.port <= 65535:
        raise ConfigurationError(f"--port must be 0 to 65535, got {args.port}")
    url = require_url(args)
    with open_connection(args) as conn:  # fail now, with a clear error, not at the first scrape
        metrics.snapshot(conn, name)
        where = admin.where(conn)
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
