"""``pgbroker migrate``: create or upgrade pgbroker's schema, or show its status or SQL."""

from __future__ import annotations

import argparse

from pgbroker.cli.options import EXIT_OK, add_database_options, require_url, schema_of
from pgbroker.database import schema
from pgbroker.errors import ConfigurationError

EXIT_NOT_CURRENT = 1  # migrate --status: the schema is not at the latest version

#: Seconds to wait for the server before giving up.
CONNECT_TIMEOUT = 10


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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
    add_database_options(parser)
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
    from pgbroker.database.sessions import connect

    name = schema_of(args)
    latest = schema.latest_version()
    if args.sql and not args.url:
        # Without a database: the whole schema, as a new database needs it.
        print(schema.migration_sql(name, 0))
        return EXIT_OK
    url = require_url(args)
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
