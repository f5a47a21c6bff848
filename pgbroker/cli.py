"""The ``pgbroker`` command.

Every option can also come from an environment variable, shown in
``--help``. Errors print one line to stderr and exit with status 2; the
database password is never printed.

A new subcommand is a function that adds its parser (see ``_add_migrate``),
listed in ``COMMANDS``; its handler takes the parsed arguments and returns
the exit status.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import psycopg

from pgbroker import __version__, schema
from pgbroker.errors import ConfigurationError, PgBrokerError
from pgbroker.urls import redact

EXIT_OK = 0
EXIT_NOT_CURRENT = 1  # migrate --status: the schema is not at the latest version
EXIT_ERROR = 2

#: Seconds to wait for the server before giving up.
CONNECT_TIMEOUT = 10


class _Env(argparse.Action):
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


def _add_database_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        action=_Env,
        env="PGBROKER_URL",
        metavar="URL",
        help="PostgreSQL URL: postgresql://user:password@host:port/database",
    )
    parser.add_argument(
        "--schema",
        action=_Env,
        env="PGBROKER_SCHEMA",
        default="pgbroker",
        metavar="NAME",
        help="schema holding pgbroker's tables (default: pgbroker)",
    )


# --- pgbroker migrate -------------------------------------------------------------


def _add_migrate(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = commands.add_parser(
        "migrate",
        help="create or upgrade pgbroker's schema",
        description=(
            "Create or upgrade pgbroker's tables. Workers do this themselves on "
            "start unless the transport option auto_migrate is False; run this "
            "command when the application's role may not change the schema."
        ),
        epilog=(
            "exit status: 0 done (--status: up to date), 1 (--status only) "
            "migrations pending or the schema is newer than this pgbroker, 2 error"
        ),
    )
    _add_database_options(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--status",
        action="store_true",
        help="show the current and latest schema versions; change nothing",
    )
    mode.add_argument(
        "--sql",
        action="store_true",
        help=(
            "print the SQL that would be run, for a DBA to review; change nothing "
            "(without --url: the SQL for a new database)"
        ),
    )
    parser.set_defaults(handler=_migrate)


def _migrate(args: argparse.Namespace) -> int:
    from pgbroker.db import connect

    name = _schema_name(args)
    latest = schema.latest_version()
    if args.sql and not args.url:
        # Without a database: the whole schema, as a new database needs it.
        print(schema.migration_sql(name, 0))
        return EXIT_OK
    url = _require_url(args)
    with connect(url, connect_timeout=CONNECT_TIMEOUT) as conn:
        where = f"{conn.info.user}@{conn.info.host}:{conn.info.port}/{conn.info.dbname}"
        current = schema.current_version(conn, name)
        shown = "none" if current is None else str(current)
        if args.sql:
            text = schema.pending_sql(conn, name)
            print(text or f"-- schema {name!r} is up to date (version {shown}); nothing to do")
            return EXIT_OK
        if args.status:
            pending = [m for m in schema.migrations() if m.version > (current or 0)]
            print(f"database: {where}")
            print(f"schema:   {name}")
            print(f"current:  {shown}")
            print(f"latest:   {latest}")
            if current is not None and current > latest:
                print(f"state:    newer than this pgbroker ({current} > {latest}): upgrade it")
                return EXIT_NOT_CURRENT
            if pending:
                names = ", ".join(f"{m.version:03d}_{m.name}" for m in pending)
                print(f"state:    {len(pending)} pending ({names}): run `pgbroker migrate`")
                return EXIT_NOT_CURRENT
            print("state:    up to date")
            return EXIT_OK
        if current is not None and current > latest:
            raise ConfigurationError(
                f"schema {name!r} is at version {current}, newer than this pgbroker "
                f"(which knows versions up to {latest}): upgrade the pgbroker package"
            )
        applied = schema.migrate(conn, name)
        if applied:
            names = ", ".join(f"{m.version:03d}_{m.name}" for m in applied)
            print(f"schema {name!r} in {where}: applied {names}; now at version {latest}")
        else:
            print(f"schema {name!r} in {where}: already at version {latest}; nothing to do")
    return EXIT_OK


# --- plumbing ---------------------------------------------------------------------

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [  # type: ignore[type-arg]
    _add_migrate,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgbroker",
        description="pgbroker: Celery on PostgreSQL alone.",
    )
    parser.add_argument("--version", action="version", version=f"pgbroker {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(commands)
    return parser


def _schema_name(args: argparse.Namespace) -> str:
    name = str(args.schema)
    if not 1 <= len(name.encode()) <= 63:
        raise ConfigurationError(f"--schema must be a name of 1 to 63 bytes, got {name!r}")
    return name


def _require_url(args: argparse.Namespace) -> str:
    if not args.url:
        raise ConfigurationError(
            "no database URL: pass --url postgresql://user:password@host/db or set PGBROKER_URL"
        )
    return str(args.url)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = getattr(args, "url", None) or ""
    try:
        return int(args.handler(args))
    except (PgBrokerError, psycopg.Error) as exc:
        _fail(str(exc), url)
    except KeyboardInterrupt:
        return 130
    return EXIT_ERROR


def _fail(message: str, url: str) -> None:
    # Errors pgbroker raises never hold the password; a raw driver error
    # might quote the URL, so redact anyway. One line, no traceback.
    line = " ".join(redact(message, url).split()) if url else " ".join(message.split())
    print(f"pgbroker: error: {line}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
