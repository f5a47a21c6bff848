"""Refusing a connection pooler that does not keep sessions.

pgbroker needs session semantics: a consumer's liveness is a session
advisory lock, LISTEN/NOTIFY wakes consumers and result waiters, beat's
leader election and durable tasks' exclusive runs are session advisory
locks. PgBouncer in ``pool_mode = transaction`` or ``statement`` hands a
client's server connection to other clients between transactions, and all
of that breaks silently. PgBouncer does not tell a client its pool mode, so
:func:`check` finds out, at connect (docs/production.md, "PgBouncer"):

1. Is there a pooler at all? The server process pid that libpq got at
   login (BackendKeyData, ``conn.info.backend_pid``) is compared with
   ``pg_backend_pid()``, which :func:`pgbroker.database.sessions.pin_session`
   reads in the round trip it makes anyway. A direct connection, or a TCP
   proxy that passes the server's messages through (HAProxy in front of
   Patroni), gets the server's own key: they are equal and nothing more
   runs. A pooler that may give the client another server connection must
   give it a key of its own (the server's key would cancel another client's
   query): PgBouncer's is random, in every pool mode (equal to the pid by a
   chance in 2**32, which only skips the probe).
2. Then the probe, at most once per process and endpoint (the verdict is
   kept, refusals too): a second session B on the same conninfo, at the
   same host and port, reads its server process, then this session A reads
   its own again, while B is still connected. Refused when A's server
   process changed between its two statements, or when B got A's server
   process: neither can happen under session pooling or on a direct
   connection, where a session keeps one server process for its whole
   life and two live sessions never share one. PgBouncer reuses the server
   connection released last, so on an idle transaction or statement pool B
   gets A's. A process is named by its pid and the server's start time
   (pg_postmaster_start_time()), should B's server be another one.

Never a false refusal; the limit is the other way: on a busy transaction
pool B may get another server connection and A its own back, and the probe
passes. B's connection and statement get :data:`PROBE_TIMEOUT` seconds
together (a session pool with every server connection taken, A's among
them, queues B's statement until one is free): past it the check is
skipped, logged at INFO, and not tried again.
"""

from __future__ import annotations

import logging
import math
import os
import select
import threading
import time
from typing import Any

import psycopg
from psycopg import pq

from pgbroker.errors import UnsupportedPooler

logger = logging.getLogger("pgbroker.database")

#: Seconds that the probe's second session may take to connect and answer.
PROBE_TIMEOUT = 2.0

#: What names a server process: its pid and the server's start time (as
#: text that no session setting changes).
SERVER_PROCESS = "SELECT pg_backend_pid(), extract(epoch FROM pg_postmaster_start_time())::text"

ServerProcess = tuple[int, str]

#: Verdicts by endpoint (conninfo, host, port): None (accepted, or not
#: known) or the refusal's message. Kept across fork: the pooler is the same.
_verdicts: dict[tuple[str, str, int], str | None] = {}
_lock = threading.Lock()
#: Probes run in this process (the tests count them).
probes = 0


def check(conn: psycopg.Connection, backend_pid: int, conninfo: str, where: str) -> None:
    """Refuse ``conn`` (raise :class:`~pgbroker.errors.UnsupportedPooler`)
    if it goes through a pooler that hands its server connection to other
    clients. ``backend_pid``: ``pg_backend_pid()`` as read on ``conn``
    (autocommit, idle); ``conninfo``: what ``conn`` was opened with,
    password included (the probe opens a second session with it);
    ``where``: ``user@host:port/db``, for the message."""
    if conn.info.backend_pid == backend_pid:
        return  # the server's own key: no pooler in between
    key = (conninfo, conn.info.host, conn.info.port)
    with _lock:
        if key not in _verdicts:
            _verdicts[key] = _probe(conn, backend_pid, conninfo, where)
        refusal = _verdicts[key]
    if refusal is not None:
        raise UnsupportedPooler(refusal)


def _probe(conn: psycopg.Connection, first_pid: int, conninfo: str, where: str) -> str | None:
    """The refusal's message if ``conn``'s server connection goes to other
    clients, else None (also when the probe cannot tell)."""
    global probes
    probes += 1
    deadline = time.monotonic() + PROBE_TIMEOUT
    try:
        other = psycopg.connect(conninfo, autocommit=True, **_same_endpoint(conn))
    except psycopg.Error as exc:
        _skipped(where, f"a second session could not connect: {_first_line(exc)}")
        return None
    try:
        theirs = _server_process(other, deadline)
        if theirs is None:
            _skipped(where, "a second session got no server connection in time")
            return None
        # B is still connected: under session pooling it keeps its own.
        row = conn.execute(SERVER_PROCESS).fetchone()
    except psycopg.Error as exc:
        if conn.closed:
            raise
        _skipped(where, _first_line(exc))
        return None
    finally:
        other.close()
    assert row is not None
    mine = (int(row[0]), str(row[1]))
    if mine[0] != first_pid:
        evidence = f"this session's statements ran on server process {first_pid}, then on {mine[0]}"
    elif theirs == mine:
        evidence = f"another session's statement ran on this session's server process {mine[0]}"
    else:
        logger.debug("pgbroker: the pooler at %s keeps sessions (session pooling)", where)
        return None
    return (
        f"pgbroker needs session pooling: PgBouncer (or another pooler) at {where} hands "
        "this session's server connection to other clients between transactions "
        f"(transaction or statement pool mode: {evidence}), which breaks LISTEN and "
        "session advisory locks (consumer crash detection, beat leader election, durable "
        "exclusive runs): set pool_mode = session for this database, or connect to "
        "PostgreSQL directly"
    )


def _same_endpoint(conn: psycopg.Connection) -> dict[str, Any]:
    """Connection parameters that take the second session where ``conn``
    went (one host of several, one address of a name), within the probe's
    time, under ``conn``'s application_name."""
    info = conn.info
    params: dict[str, Any] = {
        "host": info.host,
        "port": info.port,
        "connect_timeout": math.ceil(PROBE_TIMEOUT),
    }
    try:
        if info.hostaddr:
            params["hostaddr"] = info.hostaddr
    except psycopg.NotSupportedError:  # libpq older than 12
        pass
    name = info.parameter_status("application_name")
    if name:
        params["application_name"] = name
    return params


def _server_process(conn: psycopg.Connection, deadline: float) -> ServerProcess | None:
    """:data:`SERVER_PROCESS` on ``conn``, or None if no answer came by
    ``deadline`` (``conn`` is then left busy: close it). Through libpq
    directly: psycopg's own wait has no time limit, and PgBouncer does not
    cancel a statement that waits for a server connection."""
    pgconn = conn.pgconn
    pgconn.send_query(SERVER_PROCESS.encode())
    while True:
        pgconn.consume_input()
        if not pgconn.is_busy():
            break
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        select.select([pgconn.socket], [], [], left)
    found: ServerProcess | None = None
    error = ""
    while (result := pgconn.get_result()) is not None:
        if result.status == pq.ExecStatus.TUPLES_OK and result.ntuples == 1:
            pid, started = result.get_value(0, 0), result.get_value(0, 1)
            if pid is not None and started is not None:
                found = (int(bytes(pid)), bytes(started).decode())
        elif result.status != pq.ExecStatus.TUPLES_OK:
            error = (result.error_message or b"").decode(errors="replace")
    if found is None:
        raise psycopg.OperationalError(error or "no server process in the answer")
    return found


def _skipped(where: str, why: str) -> None:
    logger.info(
        "pgbroker: could not tell whether the pooler at %s keeps sessions (%s); not checked "
        'again in this process. pgbroker needs session pooling (docs/production.md, "PgBouncer")',
        where,
        why,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(exc).__name__


def _after_fork_in_child() -> None:
    # A thread of the parent may have held the lock at the fork.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
