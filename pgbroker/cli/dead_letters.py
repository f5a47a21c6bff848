"""``pgbroker dead-letters list|replay|drop``: look at, replay or delete dead letters."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone

from pgbroker.cli.options import (
    EXIT_INCOMPLETE,
    EXIT_OK,
    add_database_options,
    add_json,
    confirm,
    format_ago,
    format_table,
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
        "dead-letters",
        help="list, replay or drop dead-lettered messages",
        description=(
            "Messages pgbroker could not deliver are kept in the dead_letter table: "
            "rejected without requeue ('rejected'), or persistent and matching no queue "
            "('unroutable')."
        ),
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="show dead letters, newest first")
    add_database_options(listing)
    listing.add_argument("--queue", metavar="Q", help="only those of queue Q")
    listing.add_argument("--reason", metavar="R", help="only those with reason R (e.g. rejected)")
    listing.add_argument(
        "--limit", type=int, default=50, metavar="N", help="at most N (default 50)"
    )
    add_json(listing)
    listing.set_defaults(handler=_dl_list)

    replay = actions.add_parser(
        "replay",
        help="put dead letters back on their queues",
        description=(
            "Put dead letters back on their original queues, intact (same body, headers, "
            "properties and priority), as new ready messages; each leaves dead_letter in "
            "the same transaction, and the queues' consumers are woken at once. A dead "
            "letter whose queue no longer exists stays; an unroutable one is routed again "
            "by its exchange and routing key, and stays if it still matches no queue."
        ),
        epilog="exit status: 0 all replayed, 1 some kept or not found, 2 error",
    )
    _add_selection(replay)
    replay.set_defaults(handler=_dl_replay)

    drop = actions.add_parser(
        "drop",
        help="delete dead letters for good",
        description="Delete dead letters for good. Asks for confirmation unless --yes.",
        epilog="exit status: 0 done, 1 not confirmed or some not found, 2 error",
    )
    _add_selection(drop)
    drop.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    drop.set_defaults(handler=_dl_drop)


def _add_selection(parser: argparse.ArgumentParser) -> None:
    add_database_options(parser)
    parser.add_argument("ids", nargs="*", type=int, metavar="ID", help="dead letter ids")
    parser.add_argument(
        "--all", action="store_true", help="every dead letter (matching the filters)"
    )
    parser.add_argument("--queue", metavar="Q", help="only those of queue Q")
    parser.add_argument("--reason", metavar="R", help="only those with reason R")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=admin.BATCH_SIZE,
        metavar="N",
        help=f"dead letters per transaction (default {admin.BATCH_SIZE})",
    )
    add_json(parser)


def _selected_ids(args: argparse.Namespace) -> list[int] | None:
    """The ids named, or None for --all."""
    if args.ids and args.all:
        raise ConfigurationError("name dead letter ids or pass --all, not both")
    if not args.ids and not args.all:
        raise ConfigurationError(
            "name the dead letters (ids from `pgbroker dead-letters list`) or pass --all"
        )
    positive(args.batch_size, "--batch-size")
    return None if args.all else list(args.ids)


def _progress(verb: str, batch_size: int) -> admin.Progress:
    tty = sys.stderr.isatty()

    def show(done: int, total: int) -> None:
        if total > batch_size:  # only worth showing when it takes several steps
            end = "\n" if (not tty or done >= total) else ""
            prefix = "\r" if tty else ""
            print(f"{prefix}{verb} {done} of {total}", end=end, file=sys.stderr, flush=True)

    return show


def _dl_list(args: argparse.Namespace) -> int:
    positive(args.limit, "--limit")
    with open_connection(args) as conn:
        page = admin.list_dead_letters(
            conn, schema_of(args), queue=args.queue, reason=args.reason, limit=args.limit
        )
    if args.json:
        print_json(page)
        return EXIT_OK
    if not page.items:
        print("no dead letters" + (" match" if args.queue or args.reason else ""))
        return EXIT_OK
    now = datetime.now(timezone.utc)
    rows = [
        [
            str(d.id),
            format_ago(d.died_at, now),
            d.reason,
            d.queue if d.queue is not None else "-",
            f"{d.exchange or '(default)'} / {d.routing_key}",
            d.task_name or "-",
            d.task_id or "-",
            str(d.delivery_count),
            str(d.body_size),
        ]
        for d in page.items
    ]
    header = [
        "ID",
        "DIED",
        "REASON",
        "QUEUE",
        "EXCHANGE / KEY",
        "TASK",
        "TASK ID",
        "DELIVERIES",
        "BYTES",
    ]
    print(format_table(header, rows, frozenset({0, 7, 8})))
    if page.total > len(page.items):
        print(f"({len(page.items)} newest of {page.total}: --limit to see more)")
    return EXIT_OK


def _dl_replay(args: argparse.Namespace) -> int:
    ids = _selected_ids(args)
    with open_connection(args) as conn:
        result = admin.replay_dead_letters(
            conn,
            schema_of(args),
            ids,
            queue=args.queue,
            reason=args.reason,
            batch_size=args.batch_size,
            progress=_progress("replayed", args.batch_size),
        )
    if args.json:
        print_json(result)
    else:
        queues = ", ".join(f"{n} to {q!r}" for q, n in sorted(result.messages.items()))
        line = f"replayed {plural(result.replayed, 'dead letter')}"
        print(line + (f" ({queues})" if queues else ""))
        for kept in result.kept:
            print(f"kept #{kept.id}: {kept.why}")
        if result.not_found:
            print("not found: " + ", ".join(f"#{i}" for i in result.not_found))
    return EXIT_INCOMPLETE if result.kept or result.not_found else EXIT_OK


def _dl_drop(args: argparse.Namespace) -> int:
    ids = _selected_ids(args)
    name = schema_of(args)
    with open_connection(args) as conn:
        count = admin.count_dead_letters(conn, name, ids, queue=args.queue, reason=args.reason)
        result = admin.DropResult()
        if count:
            question = (
                f"Drop {plural(count, 'dead letter')} for good "
                f"(schema {name!r} in {admin.where(conn)})?"
            )
            if not confirm(question, args.yes):
                return EXIT_INCOMPLETE
            result = admin.drop_dead_letters(
                conn,
                name,
                ids,
                queue=args.queue,
                reason=args.reason,
                batch_size=args.batch_size,
                progress=_progress("dropped", args.batch_size),
            )
        elif ids:
            result.not_found = sorted(set(ids))
    if args.json:
        print_json(result)
    else:
        print(f"dropped {plural(result.dropped, 'dead letter')}")
        if result.not_found:
            print("not found: " + ", ".join(f"#{i}" for i in result.not_found))
    return EXIT_INCOMPLETE if result.not_found else EXIT_OK
