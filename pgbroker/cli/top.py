"""``pgbroker top``: ``pgbroker status`` refreshed until Ctrl-C, with rates."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import psycopg

from pgbroker.cli.options import (
    EXIT_OK,
    Env,
    add_database_options,
    json_default,
    one_line,
    positive,
    require_url,
    schema_of,
)
from pgbroker.cli.status import ACTIVITY_HELP, add_status_options, rates, render_status
from pgbroker.operations import admin


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = commands.add_parser(
        "top",
        help="status, refreshed until Ctrl-C",
        description=(
            "Show `pgbroker status`, refreshed every --interval seconds until Ctrl-C, "
            "with messages stored and removed per second between refreshes. " + ACTIVITY_HELP
        ),
    )
    add_database_options(parser)
    add_status_options(parser)
    parser.add_argument(
        "--interval",
        action=Env,
        env="PGBROKER_TOP_INTERVAL",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="seconds between refreshes (default: 2)",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=0,
        metavar="N",
        help="stop after N refreshes (default: run until Ctrl-C)",
    )
    parser.set_defaults(handler=_top)


_CLEAR = "\x1b[H\x1b[2J"


def _top(args: argparse.Namespace) -> int:
    url, name = require_url(args), schema_of(args)
    interval = float(args.interval)
    positive(interval, "--interval")
    # Redraw in place on a terminal; frames one after another otherwise.
    clear = sys.stdout.isatty() and not args.json
    conn: psycopg.Connection | None = None
    before: admin.Status | None = None
    shown = 0
    try:
        while True:
            speed = None
            try:
                if conn is None:
                    conn = admin.open_connection(url, name)
                now = admin.status(conn, name, all_queues=args.all_queues)
                speed = rates(before, now) if before else None
                before = now
                frame = None
            except psycopg.OperationalError as exc:
                if shown == 0:
                    raise  # cannot even start: an error, not a screen
                if conn is not None:
                    conn.close()
                conn, before = None, None
                frame = (
                    "pgbroker top: " + one_line(str(exc), url) + f"; retrying every {interval:g} s"
                )
            if args.json:
                if frame is None:
                    print(
                        json.dumps(
                            {
                                **dataclasses.asdict(now),
                                "rates": speed and dataclasses.asdict(speed),
                            },
                            default=json_default,
                        )
                    )
                else:
                    print(json.dumps({"error": frame}))
            else:
                text = frame if frame is not None else render_status(now, "pgbroker top", speed)
                if frame is None and speed is None:
                    text += "\n  (rates appear from the next refresh)"
                print((_CLEAR if clear else ("\n" if shown else "")) + text, flush=True)
            shown += 1
            if args.iterations and shown >= args.iterations:
                return EXIT_OK
            time.sleep(interval)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        if conn is not None:
            conn.close()
