"""``pgbroker dashboard``: serve the web dashboard with uvicorn.

Registered in :mod:`pgbroker.cli.main` like the other commands. Importing
this module imports no web library: the handler does, and says which extra
to install when they are missing.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from pgbroker.cli.options import EXIT_OK, Env, add_database_options, require_url, schema_of
from pgbroker.errors import ConfigurationError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8600


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = commands.add_parser(
        "dashboard",
        help="serve the web dashboard (read-only unless --actions)",
        description=(
            "Serve the web dashboard of a pgbroker schema: queues, consumers and the last "
            "hour at /, task search and each task's record. It binds to 127.0.0.1 unless "
            "told otherwise and is read-only unless --actions; with --token every request "
            "must give the token (HTTP basic auth: any user name, the token as the "
            "password). Needs "
            'pip install "pgbroker[dashboard]". See docs/dashboard.md.'
        ),
    )
    add_database_options(parser)
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        metavar="ADDRESS",
        help=f"address to listen on (default {DEFAULT_HOST}: this machine only)",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, metavar="N", help=f"default {DEFAULT_PORT}"
    )
    parser.add_argument(
        "--token",
        action=Env,
        env="PGBROKER_DASHBOARD_TOKEN",
        metavar="TOKEN",
        help="require this token on every request (prefer the environment variable: a "
        "command line is visible to other users of the machine)",
    )
    parser.add_argument(
        "--actions",
        action="store_true",
        help="allow actions that change data: replay or drop dead letters, send durable "
        "events, enable or disable beat entries (needs --token, and a role that may write)",
    )
    parser.add_argument(
        "--access-log", action="store_true", help="log every request (uvicorn's access log)"
    )
    parser.set_defaults(handler=_dashboard)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def address(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def log_actions() -> None:
    """Show the dashboard's log (each action, with who did it; warnings) on
    stderr, unless the logging configuration already handles it."""
    logger = logging.getLogger("pgbroker.dashboard")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _dashboard(args: argparse.Namespace) -> int:
    url = require_url(args)
    schema = schema_of(args)
    if not 0 < args.port < 65536:
        raise ConfigurationError(f"--port must be between 1 and 65535, got {args.port}")
    from pgbroker.dashboard import create_app

    app = create_app(url, schema=schema, actions=args.actions, token=args.token or None)
    settings = app.state.dashboard
    settings.check()  # a wrong URL or an old schema fails now, not on the first page
    if args.actions:
        from pgbroker.dashboard.actions import Refused, check_actions

        try:
            check_actions(settings)  # a role that may only read cannot act
        except Refused as exc:
            raise ConfigurationError(f"--actions: {exc}") from None
    try:
        import uvicorn
    except ModuleNotFoundError:
        raise ConfigurationError(
            "the dashboard needs the 'dashboard' extra: pip install \"pgbroker[dashboard]\""
        ) from None
    if not is_loopback(args.host) and not args.token:
        print(
            f"pgbroker: warning: listening on {args.host} without a token: anyone who can "
            "reach this address can read task data (set PGBROKER_DASHBOARD_TOKEN)",
            file=sys.stderr,
        )
    log_actions()
    print(
        f"pgbroker dashboard: {address(args.host, args.port)} "
        f"(schema {schema!r} of {settings.where}; Ctrl-C stops it)",
        flush=True,
    )
    try:
        uvicorn.run(
            app, host=args.host, port=args.port, log_level="warning", access_log=args.access_log
        )
    finally:
        settings.pool.close()
    return EXIT_OK
