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
# libpq's keyword=value form: "host=db password=secret" or password='a b'.
_KEYWORD = re.compile(r"(?i)(?:^|\s)password\s*=")
_KEYWORD_PASSWORD = re.compile(r"(?i)((?:^|\s)password\s*=\s*)('(?:[^'\\]|\\.)*'?|\S*)")
# A scheme with slashes at the start of a string that is not a URL
# ("postgresql:/user:pass@host", a typo).
_SCHEME_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/+")


def to_conninfo(url: str) -> str:
    """Return the libpq URL psycopg connects with."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() in SCHEMES:
        _check_user_info(url, rest)
        return "postgresql://" + rest
    shown = mask_password(url)
    if sep and scheme.lower() in _DRIVERS:
        raise ConfigurationError(
            f"unsupported URL {shown!r}: this looks like an SQLAlchemy URL "
            f"(postgresql+{scheme}://); drop the '+{scheme}' and use "
            "postgresql://user:password@host:port/database"
        )
    if not sep and _KEYWORD.search(url):
        raise ConfigurationError(
            f"unsupported connection string {shown!r}: pgbroker takes a URL, "
            "postgresql://user:password@host:port/database, not libpq's "
            "keyword=value form (every libpq keyword may go in the URL's query "
            "string: ?sslmode=require&connect_timeout=5)"
        )
    raise ConfigurationError(
        f"unsupported URL {shown!r}: pgbroker takes "
        "postgresql://user:password@host:port/database (postgres:// and "
        "pgbroker:// work too)"
    )


def _check_user_info(url: str, rest: str) -> None:
    """Refuse an unencoded '@' in the user info: libpq splits at the first
    '@' and would take the rest of the password for the host name (then
    show it in every error); other readers split at the last one."""
    authority = re.split(r"[/?]", rest, maxsplit=1)[0]
    if authority.count("@") > 1:
        raise ConfigurationError(
            f"invalid PostgreSQL URL {mask_password(url)!r}: more than one '@' before "
            "the host: percent-encode '@' in the user name or password as %40 "
            "(postgresql://user:p%40ss@host/db)"
        )


def mask_password(url: str, mask: str = "**") -> str:
    """Return ``url`` with the password (if any) replaced by ``mask``.

    Also for what is not a URL at all (no scheme, a one-slash typo, libpq's
    ``key=value`` form), as errors quote what they were given.
    """
    if "://" not in url:
        return _replace_all(_mask_not_url(url, mask), passwords(url), mask)
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
    # '?', '/' or '@' inside the password): then hide whatever libpq would
    # send, unless it is part of what is hidden already.
    masked_here = {parts.password or ""} | {m[2] for m in _QUERY_PASSWORD.finditer(parts.query)}
    masked_here |= {unquote(s) for s in masked_here}
    sent = _libpq_password(url)
    if sent and not any(sent in hidden for hidden in masked_here):
        masked = _replace_all(masked, _spellings({sent}), mask)
    return masked


def _mask_not_url(text: str, mask: str) -> str:
    if _KEYWORD.search(text):
        return _KEYWORD_PASSWORD.sub(lambda m: m[1] + mask, text)
    head, query_sep, query = text.partition("?")
    query = _QUERY_PASSWORD.sub(lambda m: m[1] + mask, query)
    userinfo, at, host = head.rpartition("@")
    if at:
        prefix = _SCHEME_PREFIX.match(userinfo)
        start = prefix.end() if prefix else 0
        user, colon, _ = userinfo[start:].partition(":")
        if colon:
            userinfo = f"{userinfo[:start]}{user}:{mask}"
        elif prefix and user:
            # "scheme:/x@host": x may be a user or a password; hide it.
            userinfo = userinfo[:start] + mask
    return f"{userinfo}{at}{host}{query_sep}{query}"


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
    prefix = None
    if sep:
        try:
            value = conninfo_to_dict("postgresql://" + rest).get("password")
        except Exception:
            value = None
    elif _KEYWORD.search(url):
        try:
            value = conninfo_to_dict(url).get("password")
        except Exception:  # malformed: hide what follows "password="
            found = _KEYWORD_PASSWORD.search(url)
            value = found[2].strip("'") if found else None
    else:
        # Not a URL: "app:pass@host/db", or "postgresql:/app:pass@host" (a
        # typo): skip a scheme followed by '/', the user name is before ':'.
        prefix = _SCHEME_PREFIX.match(url)
        rest = url[prefix.end() :] if prefix else url
    if value:
        return str(value)
    userinfo, at, _ = rest.partition("?")[0].rpartition("@")
    user, colon, guess = userinfo.partition(":")
    if at and colon and guess:
        return guess
    # "postgresql:/x@host": x may be the password (see _mask_not_url).
    return user if at and prefix and user else None


def _spellings(secrets: set[str]) -> list[str]:
    found = set()
    for secret in secrets:
        found.update({secret, unquote(secret), quote(secret, safe=""), quote(secret)})
    return sorted((s for s in found if s), key=len, reverse=True)


def _replace_all(text: str, secrets: list[str], mask: str) -> str:
    for secret in secrets:
        text = text.replace(secret, mask)
    return text
