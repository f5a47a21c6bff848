"""The transactional examples' Celery app: one task that mails an order.

The task reads the order from the database and fails if it is not there:
a task that ran before its order committed would fail loudly here. Each
mail it sends is a row in ``shop_email``, so the demos can show which
orders got one.
"""

from __future__ import annotations

import os

import psycopg
from celery import Celery

DATABASE_URL = os.environ.get("PGBROKER_URL", "postgresql://localhost/postgres")

app = Celery("transactional_example")
app.conf.broker_url = DATABASE_URL  # the app's own database is the broker
app.conf.result_backend = "rpc://"


def libpq_url(url: str) -> str:
    """postgresql:// for psycopg, whichever scheme the broker URL uses."""
    return "postgresql://" + url.partition("://")[2]


SCHEMA = """
DROP TABLE IF EXISTS shop_email, shop_order;
CREATE TABLE shop_order (id serial PRIMARY KEY, customer text NOT NULL);
CREATE TABLE shop_email (order_id int NOT NULL, sent_to text NOT NULL);
"""


def create_tables() -> None:
    with psycopg.connect(libpq_url(DATABASE_URL), autocommit=True) as conn:
        conn.execute(SCHEMA)


@app.task
def send_order_email(order_id: int) -> str:
    with psycopg.connect(libpq_url(DATABASE_URL)) as conn:
        row = conn.execute("SELECT customer FROM shop_order WHERE id = %s", [order_id]).fetchone()
        if row is None:
            raise LookupError(f"order {order_id} is not visible: the task ran before its commit")
        conn.execute("INSERT INTO shop_email VALUES (%s, %s)", [order_id, row[0]])
    return f"mail to {row[0]} for order {order_id}"
