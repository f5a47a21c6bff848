"""pgbroker: Celery on PostgreSQL alone.

Installing the package is enough for ``broker_url = "postgresql://..."``:
``pgbroker-autoload.pth`` registers the URL schemes with Kombu when Kombu is
first imported (see :mod:`pgbroker._autoload`). Where ``.pth`` files are not
processed (``python -S``, some frozen apps), ``import pgbroker`` in the
Celery config does the same.
"""

from __future__ import annotations

from pgbroker import _autoload

# Not typing.TYPE_CHECKING: importing typing costs more than the rest of
# this module, and the .pth file imports it in every Python process.
TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers; at run time, see __getattr__ below
    from pgbroker.broker.enqueue import enqueue_in as enqueue_in
    from pgbroker.errors import EnqueueError as EnqueueError

__version__ = "0.1.0"

TRANSPORT = "pgbroker.broker.transport:Transport"
SCHEMES = ("postgresql", "postgres", "pgbroker")


def register_transport() -> None:
    """Make Kombu resolve postgresql://, postgres:// and pgbroker:// to pgbroker
    now (this imports Kombu)."""
    from kombu.transport import TRANSPORT_ALIASES

    for scheme in SCHEMES:
        TRANSPORT_ALIASES[scheme] = TRANSPORT


# `import pgbroker` registers the schemes as the .pth file does: at once if
# Kombu's transports are loaded, else when they are (importing Kombu here
# would cost every process that runs the .pth about 80 ms).
_autoload.install()


def __getattr__(name: str) -> object:
    # pgbroker.enqueue_in and pgbroker.EnqueueError, imported on first use so
    # that `import pgbroker` (done by the autoload hook) stays free of psycopg.
    if name == "enqueue_in":
        from pgbroker.broker import enqueue

        return enqueue.enqueue_in
    if name == "EnqueueError":
        from pgbroker import errors

        return errors.EnqueueError
    if name == "send_event":  # durable waits' events (pgbroker.durable)
        from pgbroker import durable

        return durable.send_event
    raise AttributeError(f"module 'pgbroker' has no attribute {name!r}")
