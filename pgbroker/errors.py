"""Errors pgbroker raises, each naming the cause and the fix.

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
Messages never contain a password: they are built from the host, port, user
and database only, and URLs are shown masked.
"""

from __future__ import annotations

import psycopg


class PgBrokerError(Exception):
    """Base class of every error pgbroker raises on purpose."""


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


class MessageTooLarge(PgBrokerError, ValueError):
    """A message (body plus headers) is larger than the ``max_message_size`` option."""


class NameTooLong(PgBrokerError, ValueError):
    """A queue, exchange or routing key name is longer than pgbroker takes."""
