"""Every statement on a hot path fits psycopg's cache of parsed queries.

psycopg parses a query's ``%(name)s`` placeholders on every execute unless
the query is at most ``MAX_CACHED_STATEMENT_LENGTH`` bytes (and has at most
``MAX_CACHED_STATEMENT_PARAMS`` parameters); parsing the 7 KB
``publish_routing`` with its comments cost about 0.6 ms of client CPU per
publish. pgbroker.database.queries sends statements without their comment
lines and indentation; this test fails when one grows past the cache again.
"""

from __future__ import annotations

import re

import pytest
from psycopg import _queries

from pgbroker.database import queries

#: Run at most once per sweep or per operator command.
OCCASIONAL = {("queries.sql", "sweep")}
FILES = ["queries.sql", "backend.sql", "sweeper.sql", "durable.sql", "beat.sql", "enqueue.sql"]


@pytest.mark.parametrize("filename", FILES)
def test_statements_fit_psycopgs_parse_cache(filename: str) -> None:
    too_long = {
        name: len(text.encode())
        for name, text in queries._texts(filename).items()
        if (filename, name) not in OCCASIONAL
        and (
            len(text.encode()) > _queries.MAX_CACHED_STATEMENT_LENGTH
            or len(set(re.findall(r"%\((\w+)\)s", text))) > _queries.MAX_CACHED_STATEMENT_PARAMS
        )
    }
    assert too_long == {}


def test_statements_are_sent_named_without_comments_and_indentation() -> None:
    text = queries._texts("queries.sql")["publish_routing"]
    assert text.startswith("/* pgbroker publish_routing */\n")
    assert "--" not in text
    assert all(line == line.strip() for line in text.splitlines())
