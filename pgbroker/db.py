"""Opening connections, with errors that say what to fix."""

from __future__ import annotations

import logging
import os
import socket

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict

from pgbroker.errors import DatabaseUnavailable
from pgbroker.urls import to_conninfo

logger = logging.getLogger("pgbroker")


def default_application_name() -> str:
    return f"pgbroker:{socket.gethostname()}:{os.getpid()}"


def connect(
    url: str, *, connect_timeout: float | None = None, autocommit: bool = True
) -> psycopg.Connection:
    """Connect to the database named by a broker/backend URL.

    libpq parameters in the URL win; ``connect_timeout`` and
    ``application_name`` are only defaults.
    """
    conninfo = to_conninfo(url)
    given = _params(conninfo)
    defaults: dict[str, object] = {}
    if "application_name" not in given:
        defaults["application_name"] = default_application_name()
    if connect_timeout and "connect_timeout" not in given:
        defaults["connect_timeout"] = max(1, round(connect_timeout))
    try:
        return psycopg.connect(conninfo, autocommit=autocommit, **defaults)  # type: ignore[arg-type]
    except psycopg.OperationalError as exc:
        raise explain_connect_error(exc, given) from None


def _params(conninfo: str) -> dict[str, str]:
    try:
        return {k: str(v) for k, v in conninfo_to_dict(conninfo).items()}
    except psycopg.ProgrammingError as exc:
        # psycopg's message quotes the conninfo; keep only the reason.
        reason = str(exc).split(":", 1)[0]
        raise DatabaseUnavailable(f"invalid PostgreSQL URL: {reason}") from None


def describe(params: dict[str, str]) -> str:
    """Where we connect, without the password: 'user@host:port/db'."""
    host = params.get("host") or os.environ.get("PGHOST") or "localhost"
    port = params.get("port") or os.environ.get("PGPORT") or "5432"
    user = params.get("user") or os.environ.get("PGUSER") or "(default user)"
    dbname = params.get("dbname") or os.environ.get("PGDATABASE") or user
    return f"{user}@{host}:{port}/{dbname}"


def explain_connect_error(
    exc: psycopg.OperationalError, params: dict[str, str]
) -> DatabaseUnavailable:
    where = describe(params)
    sqlstate = getattr(exc, "sqlstate", None)
    text = str(exc)
    if sqlstate == "28P01" or "password authentication failed" in text:
        fix = (
            "the server refused the password: fix the password in the URL "
            "(or PGPASSWORD / ~/.pgpass)"
        )
    elif sqlstate == "3D000" or ("database" in text and "does not exist" in text):
        fix = (
            f"the database does not exist: create it (createdb {params.get('dbname', '')}) "
            "or fix the database name in the URL"
        )
    elif (
        sqlstate == "28000"
        or "no pg_hba.conf entry" in text
        or ("role" in text and "does not exist" in text)
    ):
        fix = "the server refused this user: check the user name and the server's pg_hba.conf"
    elif "Connection refused" in text or "No such file or directory" in text:
        fix = (
            "nothing accepts connections there: is PostgreSQL running, and are the "
            "host and port in the URL right?"
        )
    elif "timeout" in text.lower():
        fix = "the server did not answer in time: check the host, the network and firewalls"
    elif "could not translate host name" in text:
        fix = "the host name does not resolve: fix the host in the URL"
    else:
        fix = "check the URL and that the server is up"
    first_line = text.strip().splitlines()[-1] if text.strip() else type(exc).__name__
    err = DatabaseUnavailable(f"cannot connect to PostgreSQL at {where}: {fix} ({first_line})")
    err.__cause__ = None
    return err


def is_privilege_error(exc: BaseException) -> bool:
    return isinstance(exc, pgerrors.InsufficientPrivilege)
