"""``pgbroker purge``: delete a queue's ready messages."""

from __future__ import annotations

import argparse

from pgbroker.cli.options import (
    EXIT_INCOMPLETE,
    EXIT_OK,
    add_database_options,
    add_json,
    confirm,
    open_connection,
    plural,
    print_json,
    schema_of,
)
from pgbroker.operations import admin


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = commands.add_parser(
        "purge",
        help="delete a queue's ready messages",
        description=(
            "Delete the ready messages of QUEUE. Messages being worked on (reserved) "
            "and delayed ones stay. Asks for confirmation unless --yes."
        ),
        epilog="exit status: 0 done, 1 not confirmed, 2 error (e.g. no such queue)",
    )
    add_database_options(parser)
    parser.add_argument("queue", metavar="QUEUE", help="queue name")
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    add_json(parser)
    parser.set_defaults(handler=_purge)


def _purge(args: argparse.Namespace) -> int:
    name, queue = schema_of(args), args.queue
    with open_connection(args) as conn:
        ready = admin.ready_count(conn, name, queue)
        purged = 0
        if ready:
            question = (
                f"Delete {plural(ready, 'ready message')} from queue {queue!r} "
                f"(schema {name!r} in {admin.where(conn)})?"
            )
            if not confirm(question, args.yes):
                return EXIT_INCOMPLETE
            purged = admin.purge(conn, name, queue)
    if args.json:
        print_json({"queue": queue, "purged": purged})
    else:
        print(f"purged {plural(purged, 'ready message')} from queue {queue!r}")
    return EXIT_OK
