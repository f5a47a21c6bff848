"""Broker and backend URLs.

pgbroker accepts ``postgresql://``, ``postgres://`` and ``pgbroker://`` URLs.
They are libpq URLs (https://www.postgresql.org/docs/current/libpq-connect.html),
so every libpq parameter passes through as a query parameter, for example
``?sslmode=require&connect_timeout=5&application_name=billing``.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pgbroker.errors import ConfigurationError

SCHEMES = ("postgresql", "postgres", "pgbroker")


def to_conninfo(url: str) -> str:
    """Return the libpq URL psycopg connects with."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise ConfigurationError(
            f"unsupported URL {mask_password(url)!r}: pgbroker takes "
            "postgresql://user:password@host:port/database (postgres:// and "
            "pgbroker:// work too)"
        )
    return "postgresql://" + rest


def mask_password(url: str, mask: str = "**") -> str:
    """Return ``url`` with the password (if any) replaced by ``mask``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc, query = parts.netloc, parts.query
    if parts.password is not None:
        userinfo, _, hostinfo = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:{mask}@{hostinfo}"
    if "password=" in query:  # libpq also takes ?password=...
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, mask if k == "password" else v) for k, v in pairs], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))
