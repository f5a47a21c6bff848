"""Broker and backend URLs.

pgbroker accepts ``postgresql://``, ``postgres://`` and ``pgbroker://`` URLs.
They are libpq URLs (https://www.postgresql.org/docs/current/libpq-connect.html),
so every libpq parameter passes through as a query parameter, for example
``?sslmode=require&connect_timeout=5&application_name=billing``.

Passwords may be in the user info (``user:secret@host``) or a query
parameter (``?password=secret``); :func:`mask_password` and :func:`redact`
hide both before a URL or a driver message is shown to anyone.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from psycopg.conninfo import conninfo_to_dict

from pgbroker.errors import ConfigurationError

SCHEMES = ("postgresql", "postgres", "pgbroker")

# Schemes of SQLAlchemy-style URLs (postgresql+psycopg://): Kombu strips the
# "postgresql+" prefix and hands pgbroker the driver name as the scheme.
_DRIVERS = ("psycopg", "psycopg2", "psycopg2cffi", "asyncpg", "pg8000", "psycopg_async")

_QUERY_PASSWORD = re.compile(r"(?i)((?:^|&)password=)([^&]*)")


def to_conninfo(url: str) -> str:
    """Return the libpq URL psycopg connects with."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() in SCHEMES:
        return "postgresql://" + rest
    shown = mask_password(url)
    if sep and scheme.lower() in _DRIVERS:
        raise ConfigurationError(
            f"unsupported URL {shown!r}: this looks like an SQLAlchemy URL "
            f"(postgresql+{scheme}://); drop the '+{scheme}' and use "
            "postgresql://user:password@host:port/database"
        )
    raise ConfigurationError(
        f"unsupported URL {shown!r}: pgbroker takes "
        "postgresql://user:password@host:port/database (postgres:// and "
        "pgbroker:// work too)"
    )


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
    # libpq also takes ?password=...; replace only the value, so that the
    # rest of the query string is shown exactly as the user wrote it.
    query = _QUERY_PASSWORD.sub(lambda m: m[1] + mask, query)
    masked = urlunsplit(parts._replace(netloc=netloc, query=query))
    # libpq may read the URL differently from urlsplit (an unencoded '#',
    # '?' or '/' inside the password): then hide whatever libpq would send.
    masked_here = {parts.password or ""} | {m[2] for m in _QUERY_PASSWORD.finditer(parts.query)}
    sent = _libpq_password(url)
    if sent and sent not in masked_here | {unquote(s) for s in masked_here}:
        masked = _replace_all(masked, _spellings({sent}), mask)
    return masked


def passwords(url: str) -> list[str]:
    """Every spelling of the password(s) ``url`` carries, longest first."""
    found: set[str] = set()
    try:
        parts = urlsplit(url)
        if parts.password:
            found.add(parts.password)
        found.update(m[2] for m in _QUERY_PASSWORD.finditer(parts.query) if m[2])
    except ValueError:
        pass
    if sent := _libpq_password(url):
        found.add(sent)
    return _spellings(found)


def redact(text: str, url: str, mask: str = "**") -> str:
    """``text`` with every spelling of ``url``'s password replaced by ``mask``.

    For messages that may quote the URL, such as psycopg's errors about a
    malformed connection string.
    """
    return _replace_all(text, passwords(url), mask)


def _libpq_password(url: str) -> str | None:
    """The password libpq would send, or a best guess.

    When libpq finds none (a malformed URL, or an unencoded '/' in the
    password, which makes libpq read ``user:pass`` as ``host:port``), guess
    whatever sits between the first ':' and the last '@' of the part before
    the query, so that a mistyped URL is still shown without its password.
    """
    _, sep, rest = url.partition("://")
    value = None
    if sep:
        try:
            value = conninfo_to_dict("postgresql://" + rest).get("password")
        except Exception:
            value = None
    else:
        rest = url.partition(":")[2]  # "postgresql:/user:pass@host" (a typo)
    if value:
        return str(value)
    userinfo, at, _ = rest.partition("?")[0].rpartition("@")
    _, colon, guess = userinfo.partition(":")
    return guess if at and colon and guess else None


def _spellings(secrets: set[str]) -> list[str]:
    found = set()
    for secret in secrets:
        found.update({secret, unquote(secret), quote(secret, safe=""), quote(secret)})
    return sorted((s for s in found if s), key=len, reverse=True)


def _replace_all(text: str, secrets: list[str], mask: str) -> str:
    for secret in secrets:
        text = text.replace(secret, mask)
    return text
