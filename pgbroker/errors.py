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
