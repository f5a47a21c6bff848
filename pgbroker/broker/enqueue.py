"""Transactional enqueue: tasks that exist if and only if your data committed.

::

    with psycopg.connect(url) as conn, conn.transaction():
        order_id = create_order(conn, ...)
        with pgbroker.enqueue_in(conn):
            send_order_email.delay(order_id)
    # committed: the order and its task together; rolled back: neither.

While an ``enqueue_in(conn)`` block is active, every message pgbroker's
transport publishes *from this thread or asyncio task* (``.delay()``,
``apply_async``, ``send_task``, Kombu's ``Producer.publish``) is written by
the publish statement run on ``conn`` instead of on pgbroker's own session.
The message rows and their NOTIFY are then part of the caller's
transaction: no worker can see the task before the transaction commits
(uncommitted rows are invisible, and PostgreSQL delivers a NOTIFY only at
commit), and a rollback, of the transaction or of a savepoint around the
call, removes the task with the data.

Rules, each checked or documented:

* ``conn`` is a psycopg 3 ``Connection`` to the broker's database, or an
  object that wraps one: a SQLAlchemy ``Session`` or ``Connection`` (psycopg
  dialect, ``postgresql+psycopg://``) or Django's ``connection`` (psycopg 3
  backend). The first publish in a block checks that ``conn`` reaches the
  same server, database and pgbroker schema as the broker URL, and raises
  :class:`EnqueueError` naming both otherwise (one extra query per
  connection, remembered afterwards).
* On an autocommit connection outside a transaction block, each publish
  commits at once, exactly as without ``enqueue_in``.
* Blocks nest: the innermost wins; ``enqueue_in(None)`` publishes through
  pgbroker's own session again (for a message that must go out now).
* The choice is held in a :class:`contextvars.ContextVar`, so it applies to
  the thread or asyncio task that entered the block and nothing else: other
  threads keep publishing normally. ``asyncio.to_thread`` and
  ``contextvars.copy_context().run`` carry it along; a thread pool's
  ``submit`` or ``loop.run_in_executor`` does not.
* Only pgbroker's transport consults it. With a Redis or RabbitMQ broker the
  block has no effect.
* Do not wait for a task's result inside the block: the task cannot run
  before the commit.

The caller's role needs the privileges publishing needs; the error says
which to grant when it lacks them (simplest: make it a member of the
broker's role).
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Iterator
from typing import Any, Protocol

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from pgbroker.database import queries
from pgbroker.errors import EnqueueError

__all__ = ["enqueue_in"]


class _Runner(Protocol):
    """What the transport's publish needs: run a named query, get its row."""

    def run(self, query: str, /, **params: Any) -> Any: ...


class _Transport(_Runner, Protocol):
    options: Any
    queries: Any
    _io: Any

    @property
    def conn(self) -> psycopg.Connection: ...

    def _statements(self) -> contextlib.AbstractContextManager[None]: ...


#: The connection of the innermost active ``enqueue_in`` block; None:
#: pgbroker's own session (no block, or ``enqueue_in(None)``).
_target: contextvars.ContextVar[psycopg.Connection | None] = contextvars.ContextVar(
    "pgbroker_enqueue_in", default=None
)

#: Fingerprint of the broker's session, per pgbroker session (a reconnect
#: opens a new one, possibly to a restarted server).
_broker_fingerprints: weakref.WeakKeyDictionary[psycopg.Connection, str] = (
    weakref.WeakKeyDictionary()
)

#: Fingerprints a caller's connection matched, kept across blocks: a pooled
#: SQLAlchemy or Django connection is checked once, not once per request.
_verified: weakref.WeakKeyDictionary[psycopg.Connection, set[str]] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def enqueue_in(conn: Any) -> Iterator[psycopg.Connection | None]:
    """Publish pgbroker messages on ``conn``, inside its transaction.

    Yields the psycopg connection in use (unwrapped from SQLAlchemy or
    Django), or None for ``enqueue_in(None)``.
    """
    raw = _unwrap(conn)
    token = _target.set(raw)
    try:
        yield raw
    finally:
        _target.reset(token)


def active_connection() -> psycopg.Connection | None:
    """The connection messages are published on now, or None for pgbroker's own."""
    return _target.get()


def runner(transport: _Transport) -> _Runner:
    """Where ``Transport.publish`` runs its statement: the transport itself,
    or the connection of the innermost active ``enqueue_in`` block."""
    conn = _target.get()
    return transport if conn is None else _OnCallerConnection(conn, transport)


class _OnCallerConnection:
    def __init__(self, conn: psycopg.Connection, transport: _Transport) -> None:
        self.conn = conn
        self.transport = transport

    def run(self, query: str, /, **params: Any) -> Any:
        schema = self.transport.options.schema
        statement = self.transport.queries[query]
        # On pgbroker's own session: its errors stay connection errors, which
        # Kombu handles by reconnecting.
        broker = broker_fingerprint(self.transport, schema)
        try:
            self._check_same_database(schema, broker)
            # tuple_row: the caller's connection may have any row factory.
            with self.conn.cursor(row_factory=tuple_row) as cur:
                cur.execute(statement, params)
                return cur.fetchone() if cur.description else None
        except psycopg.errors.InsufficientPrivilege as exc:
            quoted = sql.Identifier(schema).as_string(self.conn)
            raise EnqueueError(
                f"enqueue_in: the role {self.conn.info.user!r} may not publish into schema "
                f"{schema!r} on {_where(self.conn)}: {_first_line(exc)}. Make it a member "
                "of the broker's role (GRANT broker_role TO app_role), or GRANT it USAGE ON "
                f"SCHEMA {quoted} and SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA {quoted}"
            ) from exc
        except (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected) as exc:
            # Serialization failure or deadlock: the caller's transaction, at
            # its own isolation level (pgbroker does not change it), lost.
            raise EnqueueError(
                f"enqueue_in: the caller's transaction failed at the publish "
                f"({type(exc).__name__}, SQLSTATE {exc.sqlstate}: {_first_line(exc)}). Under "
                "REPEATABLE READ or SERIALIZABLE any transaction can fail this way: roll it "
                "back and run the whole transaction again"
            ) from exc
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise EnqueueError(
                f"enqueue_in: the connection given to enqueue_in ({_where(self.conn)}) failed: "
                f"{_first_line(exc)}. Its transaction is lost; retry the whole transaction"
            ) from exc

    def _check_same_database(self, schema: str, broker: str) -> None:
        verified = _verified.setdefault(self.conn, set())
        if broker in verified:
            return
        mine, has_schema = fingerprint(self.conn, schema)
        if mine != broker:
            if not has_schema:
                raise EnqueueError(
                    f"enqueue_in: the connection is to {_where(self.conn)}, which has no "
                    f"pgbroker schema {schema!r}; pass a connection to the broker's database "
                    f"({_where(self.transport.conn)}), the one in broker_url"
                )
            raise EnqueueError(
                f"enqueue_in: the connection is to {_where(self.conn)}, but the broker is "
                f"{_where(self.transport.conn)} (another server, database or schema): the "
                "message and your data can commit together only in one database. Pass a "
                "connection to the broker's database, or point broker_url at yours"
            )
        verified.add(broker)


def broker_fingerprint(transport: _Transport, schema: str) -> str:
    """Server, database and schema of the transport's session (once per session).

    Its query runs on the transport's session, so its errors are classed as
    every statement there (``Transport._statements``): a session ended
    under it (pg_terminate_backend, a restart) is ``ConnectionLost``, a
    connection error Kombu and Celery reconnect on. A consumer asks for it
    when it registers (the pidbox queue's declare at worker startup): a
    raw ``AdminShutdown`` there stopped the worker as an unrecoverable error.
    """
    with transport._io, transport._statements():
        conn = transport.conn
        known = _broker_fingerprints.get(conn)
        if known is None:
            known, _ = fingerprint(conn, schema)
            _broker_fingerprints[conn] = known
        return known


def fingerprint(conn: psycopg.Connection, schema: str) -> tuple[str, bool]:
    """Server, database and schema ``conn`` reaches, and whether the schema exists."""
    query = queries.for_schema(schema, "enqueue.sql")["database_fingerprint"]
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(query, {"schema": schema})
        row = cur.fetchone()
    assert row is not None
    return str(row[0]), bool(row[1])


def _unwrap(obj: Any) -> psycopg.Connection | None:
    """The psycopg 3 connection inside ``obj``, or a TypeError saying what to pass."""
    if obj is None or isinstance(obj, psycopg.Connection):
        return obj
    if isinstance(obj, psycopg.AsyncConnection):
        raise TypeError(
            "enqueue_in needs a synchronous psycopg.Connection: Celery publishes "
            "synchronously (delay() blocks), so it cannot use an AsyncConnection"
        )
    module = type(obj).__module__
    raw: Any = obj
    if module.startswith("sqlalchemy.ext.asyncio"):
        raise TypeError(
            "enqueue_in needs a synchronous connection: Celery publishes synchronously, so "
            "it cannot use an AsyncSession or AsyncConnection; use a sync Session"
        )
    if module.startswith("sqlalchemy"):
        if callable(getattr(raw, "connection", None)):
            raw = raw.connection()  # a Session: its Connection, transaction begun
        raw = getattr(raw, "connection", raw)  # a Connection: its pooled DBAPI connection
        raw = getattr(raw, "driver_connection", raw)
    elif module.startswith("django"):
        raw.ensure_connection()  # Django's connection: open it if it is not yet
        raw = raw.connection
    if isinstance(raw, psycopg.Connection):
        return raw
    hint = ""
    if type(raw).__module__.startswith("psycopg2"):
        hint = (
            ": this is a psycopg2 connection; install psycopg 3 (Django 4.2+ then uses it; "
            "with SQLAlchemy use a postgresql+psycopg:// URL)"
        )
    raise TypeError(
        "enqueue_in needs a psycopg 3 Connection, a SQLAlchemy Session or Connection, or "
        f"Django's connection; got {type(obj).__module__}.{type(obj).__name__}{hint}"
    )


def _where(conn: psycopg.Connection) -> str:
    """user@host:port/dbname, never the password."""
    try:
        info = conn.info
        return f"{info.user}@{info.host}:{info.port}/{info.dbname}"
    except psycopg.Error:  # closed: libpq no longer knows
        return "a closed connection"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
