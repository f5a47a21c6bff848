"""Finding or starting the PostgreSQL server the tests run against."""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def libpq_url(url: str) -> str:
    """pgbroker:// and postgres:// URLs as libpq reads them."""
    _, _, rest = url.partition("://")
    return "postgresql://" + rest


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(libpq_url(url), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


_keep_alive: list[object] = []


@cache
def find_server() -> str | None:
    """URL of a server where the tests may create databases, or None."""
    if url := os.environ.get("PGBROKER_TEST_DSN"):
        return url
    if _answers(LOCAL_URL):
        return LOCAL_URL
    try:
        from pgbroker.database import embedded

        url, server = embedded.start()
        _keep_alive.append(server)
        return url
    except Exception:
        pass
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:16", driver=None).start()
        _keep_alive.append(container)
        return container.get_connection_url()
    return None


def url_for(admin_url: str, dbname: str) -> str:
    """The admin URL pointed at another database."""
    parts = urlsplit(admin_url)
    return urlunsplit(parts._replace(path="/" + dbname))


def create_database(admin_url: str, name: str, template: str | None = None) -> None:
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        q = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            q += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        conn.execute(q)


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
