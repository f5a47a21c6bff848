"""What the ``pgbroker`` subcommands share.

The database options (``--url``, ``--schema``), options that default to an
environment variable and name it in ``--help`` (:class:`Env`), the exit
statuses, the connection an operator command opens, and the output helpers
(tables, durations, times, JSON). Each command group is a module of
:mod:`pgbroker.cli`; :mod:`pgbroker.cli.main` gathers them into the parser.
This module imports none of them.
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
