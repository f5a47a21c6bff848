"""Catch a mistyped pgbroker URL before Kombu shows its password, and
give Kombu the port of a pgbroker URL.

``postgresql:/app:secret@db/jobs`` (one slash) is no URL to Kombu: it takes
the whole text for the host name of its default transport, AMQP, and then
prints it, password included, in the worker's banner and in every
"Cannot connect" retry line. :func:`guard_connection_class` makes Kombu's
``Connection`` refuse such a URL when it is created, with an error that
shows it masked.

pgbroker parses its own URLs (``can_parse_url``: libpq's multi-host syntax
and ``?sslmode=...`` survive), so Kombu leaves ``Connection.port`` unset
where it sets it for Redis or AMQP; Kombu's failover tests check that a
connection starts on its first URL by that port. The guard fills it in
from a URL that names one host. Wired by :mod:`pgbroker._autoload` when ``kombu.connection``
is imported; this module imports nothing heavy (psycopg only on an error).
"""

from __future__ import annotations

import functools
import re
from typing import Any
from urllib.parse import urlsplit

# "postgresql:/x" (one slash), "postgresql//x" (no colon), "postgresql:u:p@h"
# (no slashes; the '@' tells it from a host name "postgres:5672").
_TYPO = re.compile(r"(?i)^\s*(?:postgresql|postgres|pgbroker)\s*(?::/(?!/)|//|:(?=[^/]*@))")
_OURS = re.compile(r"(?i)^(?:postgresql|postgres|pgbroker)://")


def check_broker_url_typo(url: Any) -> None:
    """Raise ConfigurationError if ``url`` (or one of its ';'-separated
    failover URLs) is a pgbroker URL with a typo in ``scheme://``."""
    if isinstance(url, (list, tuple)):
        for one in url:
            check_broker_url_typo(one)
        return
    if not isinstance(url, str):
        return
    for one in url.split(";"):
        if _TYPO.match(one) and "://" not in one:
            from pgbroker.errors import ConfigurationError
            from pgbroker.urls import mask_password

            scheme = re.split(r"[:/]", one.strip(), maxsplit=1)[0]
            raise ConfigurationError(
                f"broker URL {mask_password(one.strip())!r} is not a URL: write "
                f"{scheme}://user:password@host:port/database (two slashes after "
                f"'{scheme}:'); Kombu would have read it as an AMQP host name"
            )


def guard_connection_class(connection_cls: Any) -> None:
    """Make ``connection_cls`` (Kombu's ``Connection``) check its URL."""
    init = connection_cls.__init__
    if getattr(init, "_pgbroker_guard", False):
        return

    @functools.wraps(init)
    def __init__(self: Any, hostname: Any = "localhost", *args: Any, **kwargs: Any) -> None:
        check_broker_url_typo(hostname)
        check_broker_url_typo(kwargs.get("alternates"))
        init(self, hostname, *args, **kwargs)
        fill_port(self)

    __init__._pgbroker_guard = True  # type: ignore[attr-defined]
    connection_cls.__init__ = __init__


def fill_port(connection: Any) -> None:
    """Set ``connection.port`` from its pgbroker URL, as Kombu does for the
    URLs it parses itself; left unset for several hosts (``db1,db2:5433``,
    libpq's syntax) and for a URL without a port."""
    url = connection.hostname
    if connection.port or not isinstance(url, str) or not _OURS.match(url):
        return
    parts = urlsplit(url)
    if "," in parts.netloc:  # several hosts: libpq reads them
        return
    try:
        port = parts.port
    except ValueError:  # not a number: libpq's error tells the user
        return
    if port:
        connection.port = port


def guard_module(module: Any) -> None:
    """The hook run once ``kombu.connection`` has been imported."""
    cls = getattr(module, "Connection", None)
    if cls is not None:
        guard_connection_class(cls)
