"""Opening connections, with errors that say what to fix.

Two kinds of failure, two error classes:

* the server cannot be reached or refuses the login (down, restarting,
  wrong password, missing database): :class:`~pgbroker.errors.DatabaseUnavailable`,
  a ``psycopg.OperationalError``, so Kombu and Celery retry it;
* the URL itself is wrong (malformed, invalid libpq parameter): a
  :class:`~pgbroker.errors.ConfigurationError`, which retrying cannot fix.

Messages name where we connect as ``user@host:port/database`` and never
contain the password.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict

from pgbroker.database import poolers
from pgbroker.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    UnsupportedServer,
    session_lost,
)
from pgbroker.urls import mask_password, redact, to_conninfo

#: The oldest PostgreSQL pgbroker runs on, as ``server_version_num``: 13.
#: What the code needs is older (plan_cache_mode, 12; procedures, 11); 13 is
#: the oldest release the SQL was reviewed against (12 left community
#: support in 2024). CI runs the tests on 15 and 18 (docs/production.md,
#: "PostgreSQL versions").
MINIMUM_SERVER_VERSION = 130000

LIBPQ_PARAMS_DOC = "https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-PARAMKEYWORDS"


def default_application_name() -> str:
    return f"pgbroker:{socket.gethostname()}:{os.getpid()}"


def connect(
    url: str,
    *,
    connect_timeout: float | None = None,
    autocommit: bool = True,
    waits: bool = False,
) -> psycopg.Connection:
    """Connect to the database named by a broker/backend URL.

    libpq parameters in the URL win; ``connect_timeout`` and
    ``application_name`` are only defaults. The session's settings are
    pinned (:func:`pin_session`), before any other statement.
    """
    conninfo = to_conninfo(url)
    given = _params(url, conninfo)
    defaults: dict[str, Any] = {}
    if "application_name" not in given:
        defaults["application_name"] = default_application_name()
    if connect_timeout and "connect_timeout" not in given:
        defaults["connect_timeout"] = max(1, round(connect_timeout))
    try:
        conn = psycopg.connect(conninfo, autocommit=True, **defaults)
    except psycopg.OperationalError as exc:
        raise explain_connect_error(exc, given, url) from None
    except psycopg.ProgrammingError as exc:
        # psycopg checks some values itself ("bad value for connect_timeout").
        raise _bad_url(url, str(exc)) from None
    try:
        pin_session(conn, conninfo=conninfo, waits=waits)
        conn.autocommit = autocommit
    except BaseException as exc:
        conn.close()
        if isinstance(exc, psycopg.Error) and session_lost(exc):
            # Ended as it started (a restart, pg_terminate_backend): retry.
            raise DatabaseUnavailable(
                f"cannot connect to PostgreSQL at {describe(given)}: the session ended as it "
                f"started, retry in a moment ({_detail(str(exc))})"
            ) from None
        raise
    return conn


def session_settings(server_version: int, *, waits: bool = False) -> str:
    """The SET statements that pin what a pgbroker session depends on,
    whatever the database, the role or the server's configuration set
    (``ALTER DATABASE/ROLE ... SET``, postgresql.conf); see
    docs/production.md, "Settings pgbroker pins":

    * ``default_transaction_isolation = 'read committed'``: every statement
      is written for it (SKIP LOCKED claims, fenced acks, the sweep's
      dead-consumer check, ON CONFLICT upserts of results and steps); under
      REPEATABLE READ or SERIALIZABLE competing consumers fail with
      serialization errors instead of skipping each other's rows;
    * ``idle_session_timeout = 0`` (PostgreSQL 14 and later): pgbroker's
      sessions are long-lived and silent by design (a consumer between
      NOTIFYs while its prefetched tasks run, pooled sessions, the beat
      leader holding its lock, a durable run holding its task's lock);
      ending one costs redeliveries and leader changes;
    * with ``waits`` (a session whose statements wait by design: the
      sweeper's ``sweeper_wait``), ``statement_timeout = 0`` and
      ``lock_timeout = 0``. Other sessions keep the role's values: their
      statements are short, and a timeout is a statement error there (a
      Kombu channel error), not a lost connection (see pgbroker.errors).

    ``idle_in_transaction_session_timeout`` is left alone: pgbroker never
    leaves a transaction open while idle.

    Not the libpq ``options`` startup parameter: PgBouncer refuses it (or
    accepts only a few parameters), and a server older than 14 refuses an
    unknown parameter there at login. One statement after connecting
    instead, once per session.
    """
    settings = {"default_transaction_isolation": "'read committed'"}
    if server_version >= 140000:
        settings["idle_session_timeout"] = "0"
    if waits:
        settings.update(statement_timeout="0", lock_timeout="0")
    return "; ".join(f"SET {name} = {value}" for name, value in settings.items())


def pin_session(conn: psycopg.Connection, *, conninfo: str, waits: bool = False) -> None:
    """Check the server's version (:func:`check_server_version`), pin the
    session's settings (see :func:`session_settings`), and refuse a pooler
    that does not keep sessions (:func:`pgbroker.database.poolers.check`),
    on an autocommit connection. One statement, once per session; more only
    through a pooler, once per process. ``conninfo``: what ``conn`` was
    opened with, password included (the pooler's probe connects with it)."""
    info = conn.info
    where = describe(
        {"host": info.host, "port": str(info.port), "user": info.user, "dbname": info.dbname}
    )
    check_server_version(info.server_version, where)
    statements = f"SELECT pg_backend_pid(); {session_settings(info.server_version, waits=waits)}"
    row = conn.execute(statements).fetchone()
    poolers.check(conn, int(row[0]) if row else 0, conninfo, where)


def check_server_version(server_version: int, where: str) -> None:
    """Refuse a server older than :data:`MINIMUM_SERVER_VERSION`, naming
    its version, the minimum and the fix. ``where``: ``user@host:port/db``."""
    if server_version < MINIMUM_SERVER_VERSION:
        raise UnsupportedServer(
            f"PostgreSQL at {where} is version {_version_text(server_version)}; pgbroker "
            f"needs {_version_text(MINIMUM_SERVER_VERSION)} or later: upgrade the server "
            "(pg_upgrade, or your provider's major version upgrade), or point the URL "
            "at a newer one"
        )


def _version_text(server_version: int) -> str:
    """130000 -> "13"; 130005 -> "13.5"; 90624 -> "9.6.24" (three parts before 10)."""
    major, minor = divmod(server_version, 10000)
    if major >= 10:
        return f"{major}.{minor}" if minor else str(major)
    return f"{major}.{minor // 100}.{minor % 100}"


def plan_for_queue_tables(conn: psycopg.Connection) -> None:
    """Plan for what a session that runs only pgbroker's own queries on the
    queue tables needs: indexes, and each prepared statement planned once.

    A queue table churns: it is new and empty at first, then mostly dead
    rows between vacuums, and its statistics lag behind. The planner then
    judges it small and plans a sequential scan for a claim or an ack,
    which reads every dead row, and a prepared statement keeps that plan
    for the session's life (measured: about 1,100 rows read per claim in a
    5,000-task Celery run on a new database). Every hot query has an index
    made for it; this makes the planner use it. Scans with no index to use
    still run, at a cost so high that it would set off JIT compilation
    (seconds for the sweep): JIT goes off too, as it should for short queries.

    Prepared statements (psycopg prepares a query after a few runs, and the
    claim at its first) run their generic plans, made once per session.
    Left to choose, PostgreSQL planned the claim again at every run: a
    custom plan for the acks actually sent (none, or one or two) always
    looks cheaper than the generic plan's guess of ten, and planning cost
    more than running (0.08 ms against 0.025 ms per claim with acks,
    measured with pg_stat_statements in a 5,000-task Celery run; an empty
    claim took 0.24 ms of the server's CPU planned each time, against under
    0.1 ms on its generic plan). Each hot statement's generic plan is
    checked in tests/test_claim_plan.py.
    """
    conn.execute(
        "SET enable_seqscan = off; SET jit = off; SET plan_cache_mode = force_generic_plan"
    )


def _params(url: str, conninfo: str) -> dict[str, str]:
    try:
        params = {k: str(v) for k, v in conninfo_to_dict(conninfo).items()}
    except psycopg.ProgrammingError as exc:
        raise _bad_url(url, str(exc)) from None
    port = params.get("port", "")
    if port and not all(p.strip().isdigit() for p in port.split(",")):
        # Often an unencoded '/' in the password: libpq then reads
        # "user:pass/word@host" as host "user", port "pass". Do not echo it.
        raise _bad_url(
            url,
            "the port is not a number (if the password contains '/', '?', '#' or '@', "
            "percent-encode them: %2F %3F %23 %40)",
        )
    return params


def _bad_url(url: str, reason: str) -> ConfigurationError:
    reason = redact(reason.strip().splitlines()[0] if reason.strip() else "", url)
    return ConfigurationError(
        f"invalid PostgreSQL URL {mask_password(url)!r}: {reason}. "
        f"libpq parameters are listed at {LIBPQ_PARAMS_DOC}"
    )


def describe(params: dict[str, str]) -> str:
    """Where we connect, without the password: 'user@host:port/db', or
    'user@host1:port1,host2:port2/db' for several hosts."""
    host = params.get("host") or os.environ.get("PGHOST") or "localhost"
    port = params.get("port") or os.environ.get("PGPORT") or "5432"
    user = params.get("user") or os.environ.get("PGUSER") or _os_user()
    dbname = params.get("dbname") or os.environ.get("PGDATABASE") or user
    hosts, ports = host.split(","), port.split(",")
    if len(ports) != len(hosts):  # libpq: one port for every host
        ports = [ports[0]] * len(hosts)
    where = ",".join(f"{h}:{p}" for h, p in zip(hosts, ports, strict=True))
    return f"{user}@{where}/{dbname}"


def _os_user() -> str:
    # libpq's default user is the operating system user.
    try:
        import getpass

        return getpass.getuser()
    except Exception:
        return "(default user)"


def explain_connect_error(
    exc: psycopg.OperationalError, params: dict[str, str], url: str = ""
) -> DatabaseUnavailable | ConfigurationError:
    """Turn psycopg's connection error into one that names the fix."""
    text = str(exc)
    detail = _detail(text)
    low = text.lower()
    if url and detail.startswith("invalid "):
        # libpq rejected a parameter value (sslmode, port...): a URL mistake.
        return _bad_url(url, detail)
    where = describe(params)
    sqlstate = getattr(exc, "sqlstate", None)
    dbname = params.get("dbname") or where.rsplit("/", 1)[-1]
    if _only_standbys(low):
        fix = (
            "no host in the URL accepts writes: those that answered are standbys (a "
            "failover in progress, or the primary is not in the URL); retry in a moment"
        )
    elif sqlstate == "28P01" or "password authentication failed" in low:
        fix = (
            "the server refused the password: fix the password in the URL "
            "(or in PGPASSWORD / ~/.pgpass)"
        )
    elif "no password supplied" in low:
        fix = (
            "the server wants a password and none was given: put it in the URL "
            "(postgresql://user:PASSWORD@host/db) or in PGPASSWORD / ~/.pgpass"
        )
    elif sqlstate == "3D000" or ("database" in low and "does not exist" in low):
        fix = (
            f"the database does not exist: create it (createdb {dbname}) "
            "or fix the database name in the URL"
        )
    elif "role" in low and "does not exist" in low:
        fix = (
            "the user does not exist on the server: fix the user name in the URL, "
            "or create the role"
        )
    elif sqlstate == "28000" or "no pg_hba.conf entry" in low:
        fix = (
            "the server does not allow this user/host/database combination: "
            "add a line to the server's pg_hba.conf, or connect as another user"
        )
    elif "could not translate host name" in low or "failed to resolve host" in low:
        fix = "the host name does not resolve: fix the host in the URL"
    elif "connection refused" in low or "no such file or directory" in low:
        fix = (
            "nothing accepts connections there: is PostgreSQL running, and are the "
            "host and port in the URL right?"
        )
    elif "starting up" in low or "shutting down" in low or "recovery mode" in low:
        fix = "the server is starting up or shutting down: retry in a moment"
    elif sqlstate == "53300" or ("too many" in low and "connections" in low):
        fix = (
            "the server has no free connection slots: raise max_connections, use "
            "fewer worker processes, or put PgBouncer (session mode) in front"
        )
    elif "ssl" in low:
        fix = "SSL negotiation failed: check sslmode in the URL and the server's SSL settings"
    elif "timeout" in low or "timed out" in low:
        fix = "the server did not answer in time: check the host, the network and firewalls"
    else:
        fix = "check the URL and that the server is up"
    return DatabaseUnavailable(f"cannot connect to PostgreSQL at {where}: {fix} ({detail})")


def _only_standbys(low: str) -> bool:
    """A connection error (lowercased) saying that the hosts that answered
    were standbys (``target_session_attrs=read-write`` or ``primary``)."""
    return "session is read-only" in low or "server is in hot standby mode" in low


def _detail(text: str) -> str:
    """The informative line of a libpq error, without psycopg's prefix; for
    several hosts, each host's failure."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "no detail"
    attempts = [line for line in lines if line.startswith("- host:")]
    if attempts:
        return "; ".join(_detail(line.partition(": connection failed: ")[2]) for line in attempts)
    line = lines[0]
    for prefix in ("connection failed: ", "connection is bad: "):
        if line.startswith(prefix):
            line = line[len(prefix) :]
    return " ".join(line.split())


def is_privilege_error(exc: BaseException) -> bool:
    return isinstance(exc, pgerrors.InsufficientPrivilege)
