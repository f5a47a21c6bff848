"""The named queries of ``sql/*.sql`` files, bound to one schema.

``sql/queries.sql`` holds the transport's queries, ``sql/backend.sql`` the
result backend's.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

from psycopg import sql

from pgbroker.options import schema_name

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@lru_cache(maxsize=4)
def _texts(filename: str = "queries.sql") -> dict[str, str]:
    text = resources.files("pgbroker.sql").joinpath(filename).read_text("utf-8")
    parts = _NAME.split(text)[1:]
    return {name: _compact(name, body) for name, body in zip(parts[::2], parts[1::2], strict=False)}


def _compact(name: str, body: str) -> str:
    """A statement as sent: named in a leading ``/* pgbroker NAME */`` (what
    pg_stat_activity, the server's log and pg_stat_statements show), without
    its comment lines and indentation.

    The comments are for the reader of the .sql file. psycopg caches its
    parsing of a query's placeholders only for queries up to 4,096 bytes
    (``MAX_CACHED_STATEMENT_LENGTH``); ``publish_routing`` with its comments
    is 7 KB, and parsing it again cost about 0.6 ms of the client's CPU on
    every publish that ran it. (No statement has a string literal or a
    dollar-quoted body spanning lines, where this would change it.)
    """
    lines = (line.strip() for line in body.splitlines())
    code = "\n".join(line for line in lines if line and not line.startswith("--"))
    return f"/* pgbroker {name} */\n{code}"


@lru_cache(maxsize=16)
def for_schema(schema: str, filename: str = "queries.sql") -> dict[str, sql.Composed]:
    """Every query of ``filename`` with ``{schema}`` replaced by the quoted identifier.

    The queries run with parameters, so psycopg reads every '%' in them as
    a placeholder, a quoted identifier's too: names with '%' are refused.
    """
    ident = sql.Identifier(schema_name("", "schema", schema))
    return {name: sql.SQL(text).format(schema=ident) for name, text in _texts(filename).items()}
