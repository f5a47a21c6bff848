"""pgbroker: Celery on PostgreSQL alone.

Installing the package is enough for ``broker_url = "postgresql://..."``:
``pgbroker-autoload.pth`` registers the URL schemes with Kombu when Kombu is
first imported (see :mod:`pgbroker._autoload`). Where ``.pth`` files are not
processed (``python -S``, some frozen apps), ``import pgbroker`` in the
Celery config does the same.
"""

from __future__ import annotations

__version__ = "0.1.0"

TRANSPORT = "pgbroker.transport:Transport"
SCHEMES = ("postgresql", "postgres", "pgbroker")


def register_transport() -> None:
    """Make Kombu resolve postgresql://, postgres:// and pgbroker:// to pgbroker."""
    from kombu.transport import TRANSPORT_ALIASES

    for scheme in SCHEMES:
        TRANSPORT_ALIASES[scheme] = TRANSPORT


register_transport()
