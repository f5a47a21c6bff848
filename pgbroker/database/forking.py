"""Connections inherited through fork.

Celery's prefork pool forks worker processes from a parent that holds open
PostgreSQL sessions. The child must neither use them (two processes on one
socket corrupt the protocol) nor close them (``close()`` sends the server a
Terminate message and ends the parent's session). Nor should the child keep
the parent's sessions alive after the parent dies: a SIGKILLed worker's
consumer session must end with it, so that the sweep sees it dead.
"""

from __future__ import annotations

import os
import secrets

import psycopg

#: Inherited connections, kept referenced so their finalisers never run.
_inherited: list[psycopg.Connection] = []


def neutralise(conn: psycopg.Connection) -> None:
    """Detach an inherited connection from the parent's socket, in the child.

    The descriptor is pointed at /dev/null: the child's copy of the socket is
    released, and the number stays taken so that no new file reuses it.
    """
    try:
        fd = conn.pgconn.socket
    except psycopg.Error:
        return  # already closed
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
    _inherited.append(conn)


_process_key: tuple[int, int] | None = None  # (pid, key)


def process_key() -> int:
    """This process's key: a random negative int4 other than -1, new in
    every process (a forked child gets its own). Its sessions hold it as a
    shared advisory lock (``process_lock`` in sql/queries.sql), so that the
    sweep can tell a consumer whose session was lost while its process
    lives from one whose process died (migrations/012_sessions_lost.sql)."""
    global _process_key
    pid = os.getpid()
    if _process_key is None or _process_key[0] != pid:
        _process_key = (pid, -secrets.randbelow(2**31 - 1) - 2)
    return _process_key[1]
