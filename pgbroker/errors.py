"""Every error pgbroker raises, in one hierarchy.

Each error names the cause and the fix. Messages never contain a password:
they are built from the host, port, user and database only, and URLs are
shown masked.

The hierarchy (other base classes in brackets; each keeps the class an
application would already catch)::

    PgBrokerError                 anything pgbroker raises on purpose
    |- ConfigurationError         [ValueError] a wrong URL or option
    |- DatabaseUnavailable        [psycopg.OperationalError] cannot connect   (connection error)
    |- ConnectionLost             [psycopg.OperationalError] a session ended  (connection error)
    |- SchemaError                the schema is missing, outdated or not usable by the role
    |- MessageTooLarge            [ValueError] more than max_message_size
    |- NameTooLong                [ValueError] a queue, exchange or routing key name
    |- EnqueueError               a publish inside pgbroker.enqueue_in failed
    |- ResultTooLarge             [kombu.exceptions.EncodeError] more than max_result_size
    |- NotFound                   an admin command named no such queue or task
    |- EntryExists                [ValueError] beat: add_entry() of an existing name
    '- EntryNotFound              [KeyError] beat: no entry of that name

(Durable execution's errors join it in their own section at the end.)

Connection problems subclass psycopg's ``OperationalError`` and are listed in
the transport's ``connection_errors``, so that Kombu and Celery reconnect on
them: :class:`DatabaseUnavailable` (cannot connect) and :class:`ConnectionLost`
(a session that ended). Any other error of a statement (a statement or lock
timeout, a serialization failure, a cancel) is raised as psycopg raised it and
counts as a channel error: the session still works, and a consumer keeps the
messages it holds (see ``Transport.connection_errors``). Everything else (a
wrong URL or option, a schema the role may not create or use, an oversized
message) is deliberately not a connection error: retrying cannot fix it, so
the worker stops with the message instead of looping.
"""

from __future__ import annotations

import psycopg
from kombu.exceptions import EncodeError

__all__ = [
    "ConfigurationError",
    "ConnectionLost",
    "DatabaseUnavailable",
    "EnqueueError",
    "EntryExists",
    "EntryNotFound",
    "MessageTooLarge",
    "NameTooLong",
    "NotFound",
    "PgBrokerError",
    "ResultTooLarge",
    "SchemaError",
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
