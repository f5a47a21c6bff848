"""The ``pgbroker`` command.

Subcommands: ``demo`` (from :mod:`pgbroker_demo`, an entry point),
``migrate``, ``status``, ``top``, ``purge``, ``dead-letters`` (``list``,
``replay``, ``drop``), ``tasks`` (``show``), ``prune``, ``metrics`` and
``dashboard`` (its module is :mod:`pgbroker.dashboard.cli`, beside the web
app it serves).
The operator commands are thin wrappers over
:mod:`pgbroker.operations.admin`; what they share is in
:mod:`pgbroker.cli.options`.

Every option can also come from an environment variable, shown in
``--help``. Errors print one line to stderr and exit with status 2; the
database password is never printed.

Each command group is a module of :mod:`pgbroker.cli` (``migrate``,
``status``, ``dead_letters``...) whose ``add_parser(commands)`` adds its
subcommand and sets its handler; a new one is listed in ``COMMANDS``. A
handler takes the parsed arguments and returns the exit status. No module of
pgbroker imports this one but the entry points (``pgbroker.cli.main:main``,
``python -m pgbroker``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import psycopg

from pgbroker import __version__
from pgbroker.cli import (
    dead_letters,
    metrics,
    migrate,
    prune,
    purge,
    status,
    tasks,
    top,
)
from pgbroker.cli.options import EXIT_ERROR, EXIT_OK, one_line
from pgbroker.dashboard import cli as dashboard
from pgbroker.errors import PgBrokerError

#: Entry points that add commands from other installed packages, listed in
#: --help before pgbroker's own: `pgbroker demo` is pgbroker_demo's, which the
#: library never imports (pyproject.toml).
PLUGIN_GROUP = "pgbroker.commands"

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [  # type: ignore[type-arg]
    migrate.add_parser,
    status.add_parser,
    top.add_parser,
    purge.add_parser,
    dead_letters.add_parser,
    tasks.add_parser,
    prune.add_parser,
    metrics.add_parser,
    dashboard.add_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgbroker",
        description="pgbroker: Celery on PostgreSQL alone.",
    )
    parser.add_argument("--version", action="version", version=f"pgbroker {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in [*plugin_commands(), *COMMANDS]:
        add(commands)
    return parser


def plugin_commands() -> list[Callable[[argparse._SubParsersAction], None]]:  # type: ignore[type-arg]
    """The ``add_parser`` functions of the installed packages' commands."""
    from importlib.metadata import entry_points

    found = sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name)
    return [entry.load() for entry in found]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = getattr(args, "url", None) or ""
    try:
        return int(args.handler(args))
    except (PgBrokerError, psycopg.Error) as exc:
        _fail(str(exc), url)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `pgbroker tasks | head`: the reader left; not an error worth a traceback.
        sys.stderr.close()
        return EXIT_OK
    return EXIT_ERROR


def _fail(message: str, url: str) -> None:
    print(f"pgbroker: error: {one_line(message, url)}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
