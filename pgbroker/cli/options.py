"""What every ``pgbroker`` subcommand shares, and (for now) the subcommands.

The database options (``--url``, ``--schema``), options that default to an
environment variable (``Env``), the exit statuses and the output helpers.
The subcommands ``purge``, ``dead-letters``
and ``tasks`` are still here; the parser is in :mod:`pgbroker.cli.main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from datetime import datetime, timezone
from typing import Any

import psycopg

from pgbroker.errors import ConfigurationError
from pgbroker.operations import admin
from pgbroker.options import schema_name
from pgbroker.urls import redact

EXIT_OK = 0
EXIT_INCOMPLETE = 1  # not confirmed, or some of the dead letters named were not acted on
EXIT_ERROR = 2


class Env(argparse.Action):
    """An option that defaults to an environment variable, named in --help.

    The value itself is never shown in --help: a URL may hold a password.
    """

    def __init__(self, option_strings: list[str], dest: str, env: str, **kwargs: object) -> None:
        self.env = env
        default = kwargs.pop("default", None)
        kwargs["help"] = f"{kwargs.get('help', '')} [env: {env}]"
        super().__init__(
            option_strings,
            dest,
            default=os.environ.get(env) or default,
            **kwargs,  # type: ignore[arg-type]
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)


def add_database_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        action=Env,
        env="PGBROKER_URL",
        metavar="URL",
        help="PostgreSQL URL: postgresql://user:password@host:port/database",
    )
    parser.add_argument(
        "--schema",
        action=Env,
        env="PGBROKER_SCHEMA",
        default="pgbroker",
        metavar="NAME",
        help="schema holding pgbroker's tables (default: pgbroker)",
    )


def schema_of(args: argparse.Namespace) -> str:
    return schema_name("", "--schema", str(args.schema))


def require_url(args: argparse.Namespace) -> str:
    if not args.url:
        raise ConfigurationError(
            "no database URL: pass --url postgresql://user:password@host/db or set PGBROKER_URL"
        )
    return str(args.url)


def one_line(message: str, url: str) -> str:
    # Errors pgbroker raises never hold the password; a raw driver error
    # might quote the URL, so redact anyway.
    return " ".join(redact(message, url).split()) if url else " ".join(message.split())


# --- operator commands: shared pieces ------------------------------------------------


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON, for scripts")


def open_connection(args: argparse.Namespace) -> psycopg.Connection:
    return admin.open_connection(require_url(args), schema_of(args))


def print_json(value: Any) -> None:
    data = (
        dataclasses.asdict(value)
        if dataclasses.is_dataclass(value) and not isinstance(value, type)
        else value
    )
    print(json.dumps(data, default=json_default, sort_keys=False))


def json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(bytes(value))} bytes>"
    return str(value)


def confirm(question: str, yes: bool) -> bool:
    """Ask on stderr, read the answer from stdin (so stdout stays clean)."""
    if yes:
        return True
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    if not sys.stdin.isatty():
        print(file=sys.stderr)  # the answer was not echoed: end the prompt's line
    if answer.strip().lower() in ("y", "yes"):
        return True
    print("pgbroker: not confirmed; nothing changed (--yes skips the question)", file=sys.stderr)
    return False


def positive(value: float, option: str) -> None:
    if value <= 0:
        raise ConfigurationError(f"{option} must be greater than 0, got {value:g}")


def format_table(
    header: list[str], rows: list[list[str]], right: frozenset[int] = frozenset()
) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        out = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    return "\n".join(line(r) for r in [header, *rows])


def format_age(seconds: float | None) -> str:
    """A short duration: 45s, 3m05s, 2h07m, 4d03h."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_ago(when: datetime | None, now: datetime | None = None) -> str:
    if when is None:
        return "-"
    now = now or datetime.now(timezone.utc)
    return f"{format_age((now - when).total_seconds())} ago"


def format_time(when: datetime | None) -> str:
    return "-" if when is None else when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# --- pgbroker purge ---------------------------------------------------------------


def _add_purge(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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


# --- pgbroker dead-letters --------------------------------------------------------


def _add_dead_letters(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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


# --- pgbroker tasks ---------------------------------------------------------------


def _add_tasks(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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
            ("updated", format_time(r.updated_at)),
            ("done", None if r.date_done is None else format_time(r.date_done)),
        ]
        out += [f"  {k + ':':<10} {v}" for k, v in fields if v is not None]
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
