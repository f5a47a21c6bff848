"""Every error pgbroker raises, and the one place psycopg's errors are classed.

Each error names the cause and the fix. Messages never contain a password:
they are built from the host, port, user and database only, and URLs are
shown masked.

The hierarchy (other base classes in brackets; each keeps the class an
application would already catch)::

    PgBrokerError                 anything pgbroker raises on purpose
    |- ConfigurationError         [ValueError] a wrong URL or option
    |- DatabaseUnavailable        [psycopg.OperationalError] cannot connect   (connection error)
    |- ConnectionLost             [psycopg.OperationalError] a session ended  (connection error)
    |- UnsupportedServer          the PostgreSQL server is older than pgbroker supports
    |- UnsupportedPooler          a pooler in transaction or statement mode (PgBouncer)
    |- SchemaError                the schema is missing, outdated or not usable by the role
    |- MessageTooLarge            [ValueError] more than max_message_size
    |- NameTooLong                [ValueError] a queue, exchange or routing key name
    |- EnqueueError               a publish inside pgbroker.enqueue_in failed
    |- ResultTooLarge             [kombu.exceptions.EncodeError] more than max_result_size
    |- NotFound                   an admin command named no such queue or task
    |- EntryExists                [ValueError] beat: add_entry() of an existing name
    |- EntryNotFound              [KeyError] beat: no entry of that name
    |  durable execution (pgbroker.durable), in a section of their own at the end:
    |- NonDeterministicWorkflow   a run reached a recorded step under another name
    |- StepOutputError            [TypeError] a step's value cannot be encoded
    |- LeaseLost                  the session holding a run's lock was lost
    |- EventTimeout               [TimeoutError] wait_for_event timed out
    |- ExclusiveKeyBusy           another run holds the task's exclusive_key
    '- DurableWaitError           a durable wait where a task cannot park

Connection errors, statement errors and the rest
-------------------------------------------------
psycopg raises ``OperationalError`` both for a session that is gone and for
a statement that failed on a session that still works. Kombu and Celery act
on the transport's ``connection_errors`` (reconnect, which hands back every
message a consumer holds) and ``channel_errors`` (the channel's operation
failed; the connection stays). :func:`classify` tells them apart, and
:func:`wrap_exceptions` applies it where pgbroker runs its statements (the
transport's session):

* ``"connection"``: the session is gone or could not be opened: a SQLSTATE
  of class 08 or of :data:`SESSION_ENDED` (a restart, pg_terminate_backend,
  an idle timeout), a libpq error without a SQLSTATE (the socket closed), or
  any error on a connection that psycopg reports closed. It leaves as
  :class:`ConnectionLost` (:class:`DatabaseUnavailable` when connecting);
  retrying on a new session can work. psycopg's ``InterfaceError`` (a
  connection it cannot use) is one too, raised as it is. So is a read-only
  transaction (25006, :data:`READ_ONLY`): the session is on a standby or on
  a primary being demoted in a failover, and only a new session can reach
  the new primary (libpq's ``target_session_attrs=read-write`` picks it among
  several hosts); the message says so. :data:`CONNECTION_ERRORS`.
* ``"statement"``: the statement's own failure on a session that still
  works: a statement timeout or cancel (57014), a lock timeout (55P03), a
  serialization failure (40001) or deadlock (40P01), a full disk (53100).
  It is raised as psycopg raised it (``except psycopg.errors.LockNotAvailable``
  keeps working), and the consumer keeps its session and its messages.
  :data:`STATEMENT_ERRORS`.
* ``"other"``: retrying cannot fix it (a wrong URL or option, a schema the
  role may not create or use, an oversized message, a constraint, a bug):
  in neither tuple, so the worker stops with the message instead of looping.

``ConnectionLost`` and ``DatabaseUnavailable`` stay ``OperationalError``s
for code that catches those, so they are also instances of a channel error
class: Kombu and Celery test ``connection_errors`` first, and so must any
other reader of the two tuples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import psycopg
from kombu.exceptions import EncodeError

__all__ = [
    "CONNECTION_ERRORS",
    "READ_ONLY",
    "SESSION_ENDED",
    "STATEMENT_ERRORS",
    "ConfigurationError",
    "ConnectionLost",
    "DatabaseUnavailable",
    "DurableWaitError",
    "EnqueueError",
    "EntryExists",
    "EntryNotFound",
    "EventTimeout",
    "ExclusiveKeyBusy",
    "LeaseLost",
    "MessageTooLarge",
    "NameTooLong",
    "NonDeterministicWorkflow",
    "NotFound",
    "PgBrokerError",
    "ResultTooLarge",
    "SchemaError",
    "StepOutputError",
    "UnsupportedPooler",
    "UnsupportedServer",
    "classify",
    "session_lost",
    "statement_error",
    "wrap_exceptions",
]


class PgBrokerError(Exception):
    """Base class of every error pgbroker raises on purpose."""


# --- configuration and connections ----------------------------------------------------


class ConfigurationError(PgBrokerError, ValueError):
    """A URL or an option is wrong; fix the configuration."""


class DatabaseUnavailable(PgBrokerError, psycopg.OperationalError):
    """The server could not be reached or refused the login."""


class ConnectionLost(PgBrokerError, psycopg.OperationalError):
    """The session with PostgreSQL ended (server restart or crash,
    pg_terminate_backend, network failure, an idle timeout): reconnect. A
    consumer's unacked messages go back to their queues; a session lost
    while its process lives does not count towards ``max_deliveries``."""


class UnsupportedServer(PgBrokerError):
    """The PostgreSQL server is older than pgbroker supports
    (``pgbroker.database.sessions.MINIMUM_SERVER_VERSION``); retrying
    cannot fix it."""


class UnsupportedPooler(PgBrokerError):
    """The URL leads to a connection pooler that hands a session's server
    connection to other clients between transactions (PgBouncer's
    transaction or statement pool mode), which breaks LISTEN and session
    advisory locks (``pgbroker.database.poolers``); retrying cannot fix it."""


class SchemaError(PgBrokerError):
    """The pgbroker schema is missing, outdated, or cannot be created or used
    by this role; the message says what to run or to GRANT."""


# --- the broker -------------------------------------------------------------------------


class MessageTooLarge(PgBrokerError, ValueError):
    """A message (body plus headers) is larger than the ``max_message_size`` option."""


class NameTooLong(PgBrokerError, ValueError):
    """A queue, exchange or routing key name is longer than pgbroker takes."""


class EnqueueError(PgBrokerError):
    """A publish inside ``enqueue_in`` could not be written on the given
    connection (another database, no pgbroker schema, missing privileges, a
    broken connection). The caller's transaction should be rolled back.

    Deliberately not a ``psycopg.OperationalError``: Kombu would retry it by
    reconnecting the broker, which cannot repair the caller's connection.
    """


# --- the result backend -----------------------------------------------------------------


class ResultTooLarge(PgBrokerError, EncodeError):
    """A task's encoded result is larger than the ``max_result_size`` option.

    An ``EncodeError``, so Celery fails the task with it instead of breaking
    the worker.
    """


# --- operations: admin commands and beat ------------------------------------------------


class NotFound(PgBrokerError):
    """The queue or task named does not exist."""


class EntryExists(PgBrokerError, ValueError):
    """add_entry() with the name of an existing entry."""


class EntryNotFound(PgBrokerError, KeyError):
    """No entry of that name."""


# --- classing psycopg's errors ----------------------------------------------------------

#: SQLSTATEs of a session the server ended: pg_terminate_backend or a fast
#: shutdown (57P01), a crash of another backend (57P02), a server still
#: starting (57P03), the database dropped (57P04), idle_session_timeout
#: (57P05), idle_in_transaction_session_timeout (25P03). Class 08
#: (connection exception) counts too: see :func:`session_lost`.
SESSION_ENDED = frozenset({"57P01", "57P02", "57P03", "57P04", "57P05", "25P03"})

#: A read-only transaction (25006): a session on a standby, or on a primary
#: being demoted in a failover (or one with default_transaction_read_only).
#: The statement cannot succeed on this session; a new one can reach the
#: primary, so it counts as a lost session.
READ_ONLY = frozenset({"25006"})

#: The errors Kombu and Celery reconnect on (the transport's
#: ``connection_errors``): a session that is gone, one that cannot be
#: opened, and psycopg's own complaint about a connection it cannot use.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    ConnectionLost,
    DatabaseUnavailable,
    psycopg.InterfaceError,
)

#: psycopg's classes of a statement's own error (the transport's
#: ``channel_errors``), once lost sessions are taken out (they leave
#: :func:`wrap_exceptions` as ConnectionLost): every ``OperationalError``
#: (timeouts, cancels, serialization failures, deadlocks, a full disk).
STATEMENT_ERRORS: tuple[type[psycopg.Error], ...] = (psycopg.OperationalError,)

#: Set on an error that :func:`wrap_exceptions` classed as a statement's own.
_STATEMENT_MARK = "pgbroker_statement"

Kind = Literal["connection", "statement", "other"]


def session_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection itself is gone, so that the same
    work may be tried once more on a fresh one: a server restart,
    pg_terminate_backend, a network failure, a session left on a read-only
    server by a failover (:data:`READ_ONLY`). Not an error of the statement
    (a constraint, a statement timeout), which a retry would only repeat."""
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    if state is None:
        # libpq's own errors: the socket closed, the server did not answer.
        return isinstance(exc, psycopg.OperationalError)
    return state.startswith("08") or state in SESSION_ENDED or state in READ_ONLY


def classify(exc: BaseException, *, session_gone: bool = False) -> Kind:
    """Class an error as Kombu should see it (see the module docstring):
    ``"connection"``, ``"statement"`` or ``"other"``. ``session_gone``: the
    connection the statement ran on is known to be closed, whatever the
    error says."""
    if isinstance(exc, CONNECTION_ERRORS):
        return "connection"
    if not isinstance(exc, psycopg.Error) or isinstance(exc, PgBrokerError):
        return "other"
    if session_gone or session_lost(exc):
        return "connection"
    if isinstance(exc, STATEMENT_ERRORS):
        return "statement"
    return "other"


def statement_error(exc: BaseException) -> bool:
    """Whether :func:`wrap_exceptions` classed ``exc`` as a statement's own
    error on a session that still works."""
    return bool(getattr(exc, _STATEMENT_MARK, False))


@contextlib.contextmanager
def wrap_exceptions(session_gone: Callable[[], bool] | None = None) -> Iterator[None]:
    """Translate the psycopg errors of the statements run inside, by
    :func:`classify`: a lost session is raised as :class:`ConnectionLost`
    (chained to psycopg's error); a statement's own error is raised as
    psycopg raised it, marked (see :func:`statement_error`); anything else
    unchanged. ``session_gone`` tells whether the session the statements
    ran on is closed (asked only when one fails).

    A context manager, or a decorator: ``@wrap_exceptions()``.
    """
    try:
        yield
    except psycopg.Error as exc:
        gone = session_gone is not None and session_gone()
        kind = classify(exc, session_gone=gone)
        if kind == "connection" and not isinstance(exc, CONNECTION_ERRORS):
            text = str(exc).strip()
            detail = text.splitlines()[0] if text else ""
            if exc.sqlstate in READ_ONLY:
                raise ConnectionLost(
                    "pgbroker: the session is on a read-only server (a standby, or a primary "
                    f"being demoted in a failover) ({type(exc).__name__}: {detail}): "
                    "reconnecting to reach the primary; with several hosts in the URL, "
                    "target_session_attrs=read-write makes libpq pick it"
                ) from exc
            raise ConnectionLost(
                f"pgbroker: the session with PostgreSQL was lost ({type(exc).__name__}: {detail})"
            ) from exc
        if kind == "statement":
            setattr(exc, _STATEMENT_MARK, True)
        raise


# --- durable execution (pgbroker.durable) -------------------------------------------


class NonDeterministicWorkflow(PgBrokerError):
    """A run of a durable task reached a recorded step index with another
    step name: the task's code does not call the same steps in the same
    order on every run."""


class StepOutputError(PgBrokerError, TypeError):
    """A step's return value cannot be encoded with the result serializer."""


class LeaseLost(PgBrokerError):
    """The session holding a running task's lock was lost: another run of the
    task id may own it now, so this run must not record any more steps."""


class EventTimeout(PgBrokerError, TimeoutError):
    """``wait_for_event`` reached its timeout before the event was sent."""


class ExclusiveKeyBusy(PgBrokerError):
    """Another run holds the task's ``exclusive_key`` (``on_conflict`` "wait"
    timed out, or "retry" spent its retries)."""


class DurableWaitError(PgBrokerError):
    """A durable wait was used where a task cannot park (a direct call, an
    eager task)."""
