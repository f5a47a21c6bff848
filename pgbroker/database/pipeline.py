"""libpq's pipeline mode on a psycopg connection: the one module that drives
``conn.pgconn`` (psycopg's low-level libpq wrapper) for pipelined statements.

Used by the transport's claim (``Transport._run_pipelined``, ``_settle``),
the result backend's writes (``_Pipeline``) and the result consumer's
LISTENs and reads. Each of them sends statements without waiting for their
replies and reads the replies later, in the order it sent them:

* every statement's reply ends with ``None`` from :func:`next_result` (or
  :func:`take_result`);
* every :func:`sync` point answers with one result whose :func:`is_sync` is
  true (it commits what was sent since the previous one, unless a statement
  failed);
* after a statement fails, the next ones up to the sync point answer
  :func:`is_aborted` instead of running;
* :func:`error` turns a failed statement's result into the psycopg exception
  (with its diagnostics) that ``execute()`` would have raised.

The socket is non-blocking: :func:`flush` sends what libpq holds, reading
while it writes, and :func:`next_result` waits for a reply on the socket;
:func:`ready` and :func:`take_result` never wait. Callers serialise the use
of a connection themselves (they hold ``conn.lock`` or their own lock).
"""

from __future__ import annotations

import contextlib
import functools
import re
import select
from collections.abc import Iterator, Sequence

import psycopg
from psycopg import pq
from psycopg.abc import Buffer
from psycopg.errors import error_from_result

from pgbroker.errors import ConnectionLost

#: psycopg's named placeholder, %(name)s, in a statement's text.
_PLACEHOLDER = re.compile(rb"%\((\w+)\)s")


@functools.lru_cache(maxsize=32)
def numbered(query: bytes) -> tuple[bytes, list[str]]:
    """``query`` (a named statement's text) with libpq's $n placeholders, for
    :func:`prepare`, and the parameter name of each $n in order."""
    names: list[str] = []

    def number(match: re.Match[bytes]) -> bytes:
        name = match[1].decode()
        if name not in names:
            names.append(name)
        return b"$%d" % (names.index(name) + 1)

    return _PLACEHOLDER.sub(number, query), names


#: Longest wait on the socket in one step, in seconds: a lost connection is
#: noticed at least this often.
STEP = 1.0

# --- entering and leaving ----------------------------------------------------------


def enter(conn: psycopg.Connection) -> None:
    """Put the connection in pipeline mode (it must be idle)."""
    conn.pgconn.enter_pipeline_mode()


def leave(conn: psycopg.Connection) -> None:
    """Leave pipeline mode: every reply must have been read."""
    conn.pgconn.exit_pipeline_mode()


# --- sending -----------------------------------------------------------------------


def prepare(conn: psycopg.Connection, name: bytes, query: bytes, types: Sequence[int]) -> None:
    """Queue the preparation of ``query`` ($n placeholders) as ``name``,
    with the type oid of each parameter. Its reply is one statement's."""
    conn.pgconn.send_prepare(name, query, types)


def send_prepared(
    conn: psycopg.Connection,
    name: bytes,
    values: Sequence[Buffer | None],
    formats: Sequence[int] | None = None,
) -> None:
    """Queue a run of the prepared statement ``name``; ``formats`` says
    which values are binary (1) rather than text (0), all text by default."""
    conn.pgconn.send_query_prepared(name, values, formats)


def send_query(conn: psycopg.Connection, query: bytes) -> None:
    """Queue a statement without parameters (extended protocol)."""
    conn.pgconn.send_query_params(query, None)


def request_flush(conn: psycopg.Connection) -> None:
    """Ask the server to send the replies so far now, not at the next sync."""
    conn.pgconn.send_flush_request()


def sync(conn: psycopg.Connection) -> None:
    """Queue a sync point: it ends (commits) the implicit transaction."""
    conn.pgconn.pipeline_sync()


def flush(conn: psycopg.Connection, timeout: float = STEP) -> None:
    """Send everything queued, waiting on the socket when it is full."""
    pgconn = conn.pgconn
    while pgconn.flush() == 1:
        # Read while writing: a server blocked on sending us replies would
        # stop reading what we send.
        readable, _, _ = select.select([pgconn.socket], [pgconn.socket], [], timeout)
        if readable:
            pgconn.consume_input()


# --- reading -------------------------------------------------------------------------


def consume(conn: psycopg.Connection) -> None:
    """Read what has arrived on the socket, without waiting."""
    conn.pgconn.consume_input()


def ready(conn: psycopg.Connection) -> bool:
    """Read what has arrived, without waiting: whether a whole result is
    there to take (or no result is expected)."""
    consume(conn)
    return not busy(conn)


def busy(conn: psycopg.Connection) -> bool:
    """Whether the next result is still incomplete, given what was read."""
    return bool(conn.pgconn.is_busy())


def wait(conn: psycopg.Connection, timeout: float = STEP) -> None:
    """Wait until libpq has a whole result to hand out.

    Raises :class:`ConnectionLost` when the session ends meanwhile.
    """
    pgconn = conn.pgconn
    pgconn.consume_input()
    while pgconn.is_busy():
        select.select([pgconn.socket], [], [], timeout)
        pgconn.consume_input()
        if pgconn.status != pq.ConnStatus.OK:
            raise ConnectionLost("pgbroker: the connection to PostgreSQL was lost")


def next_result(conn: psycopg.Connection) -> pq.abc.PGresult | None:
    """The next result, waiting for it: ``None`` ends one statement's reply."""
    wait(conn)
    return conn.pgconn.get_result()


def take_result(conn: psycopg.Connection) -> pq.abc.PGresult | None:
    """The next result when :func:`busy` is false (never waits)."""
    return conn.pgconn.get_result()


def notifies(conn: psycopg.Connection) -> list[pq.PGnotify]:
    """The notifications read so far, in order."""
    pgconn = conn.pgconn
    out = []
    while (n := pgconn.notifies()) is not None:
        out.append(n)
    return out


def is_sync(res: pq.abc.PGresult) -> bool:
    """Whether ``res`` is the reply to a sync point."""
    return res.status == pq.ExecStatus.PIPELINE_SYNC


def is_aborted(res: pq.abc.PGresult) -> bool:
    """Whether ``res`` says its statement was skipped: an earlier one
    before the same sync point failed."""
    return res.status == pq.ExecStatus.PIPELINE_ABORTED


def has_rows(res: pq.abc.PGresult) -> bool:
    """Whether ``res`` holds rows (a statement that returns rows ran)."""
    return res.status == pq.ExecStatus.TUPLES_OK


def error(conn: psycopg.Connection, res: pq.abc.PGresult) -> psycopg.Error | None:
    """The exception ``res`` stands for when its statement failed (the
    psycopg class of its SQLSTATE, with its diagnostics), else None."""
    if res.status != pq.ExecStatus.FATAL_ERROR:
        return None
    return error_from_result(res, encoding=conn.info.encoding)


# --- the session ---------------------------------------------------------------------


def alive(conn: psycopg.Connection) -> bool:
    """Whether libpq still has a working session (as of the last read)."""
    return conn.pgconn.status == pq.ConnStatus.OK


@contextlib.contextmanager
def transaction(conn: psycopg.Connection) -> Iterator[None]:
    """One transaction in psycopg's pipeline, on an autocommit session:
    BEGIN, the block's statements and COMMIT go out together, so it costs
    one round trip, plus one for each reply the block reads before its end
    (a cursor's ``fetchone()``). BEGIN and COMMIT are sent by hand:
    psycopg's ``transaction()`` inside a pipeline syncs once more as it
    ends. Whatever the block raises rolls the transaction back."""
    try:
        with conn.pipeline():
            conn.execute("BEGIN")
            yield
            conn.execute("COMMIT")
    except BaseException:
        if not conn.closed and conn.info.transaction_status != pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")
        raise
