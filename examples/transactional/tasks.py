"""The transactional examples' Celery app: one task that mails an order.

The task reads the order from the database and fails if it is not there:
a task that ran before its order committed would fail loudly here. Each
mail it sends is a row in ``shop_email``, so the demos can show which
orders got one. The example keeps its tables, and pgbroker's, in a schema of
its own (``PGBROKER_EXAMPLE_SCHEMA``, default ``pgbroker_transactional``):
its connections put that schema first in their ``search_path``, and pgbroker
is told by the ``schema`` option. An application's ``pgbroker`` schema, its
queues and its ``public`` tables are never touched.
"""

from __future__ import annotations

import os
import re

import psycopg
from celery import Celery

DATABASE_URL = os.environ.get("PGBROKER_URL", "postgresql://localhost/postgres")
SCHEMA = os.environ.get("PGBROKER_EXAMPLE_SCHEMA", "pgbroker_transactional")
if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", SCHEMA):
    raise SystemExit(f"PGBROKER_EXAMPLE_SCHEMA must be a plain lower-case name, got {SCHEMA!r}")
#: libpq's ``options`` for the example's connections: its tables first.
SEARCH_PATH = f"-c search_path={SCHEMA}"

app = Celery("transactional_example")
app.conf.broker_url = DATABASE_URL  # the app's own database is the broker
app.conf.result_backend = DATABASE_URL  # and the result backend
app.conf.broker_transport_options = {"schema": SCHEMA}
app.conf.result_backend_transport_options = {"schema": SCHEMA}


def libpq_url(url: str) -> str:
    """postgresql:// for psycopg, whichever scheme the broker URL uses."""
    return "postgresql://" + url.partition("://")[2]


TABLES = """
CREATE TABLE shop_order (id serial PRIMARY KEY, customer text NOT NULL);
CREATE TABLE shop_email (order_id int NOT NULL, sent_to text NOT NULL);
"""


def connect(**kwargs) -> psycopg.Connection:  # type: ignore[no-untyped-def]
    """A connection whose unqualified table names are the example's."""
    return psycopg.connect(libpq_url(DATABASE_URL), options=SEARCH_PATH, **kwargs)


def create_tables() -> None:
    """In the example's schema, just created by run_*.py (common.own_schema)."""
    with connect(autocommit=True) as conn:
        conn.execute(TABLES)


@app.task
def send_order_email(order_id: int) -> str:
    with connect() as conn:
        row = conn.execute("SELECT customer FROM shop_order WHERE id = %s", [order_id]).fetchone()
        if row is None:
            raise LookupError(f"order {order_id} is not visible: the task ran before its commit")
        conn.execute("INSERT INTO shop_email VALUES (%s, %s)", [order_id, row[0]])
    return f"mail to {row[0]} for order {order_id}"
