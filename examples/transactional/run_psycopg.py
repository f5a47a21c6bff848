"""Transactional enqueue with plain psycopg 3.

    python examples/transactional/run_psycopg.py

An order and the task that mails it commit together, or neither does.
Uses PGBROKER_URL if set, else an embedded PostgreSQL.
"""

from __future__ import annotations

import sys

import psycopg
from common import TIMEOUT, database, emails_sent, example, messages_for, worker

import pgbroker


class PaymentDeclined(Exception):
    pass


def place_order(conn: psycopg.Connection, tasks, customer: str, pay: bool):  # type: ignore[no-untyped-def]
    """Insert the order and enqueue its mail in one transaction."""
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO shop_order (customer) VALUES (%s) RETURNING id", [customer]
        ).fetchone()
        order_id = row[0] if row else None
        with pgbroker.enqueue_in(conn):
            result = tasks.send_order_email.delay(order_id)
        print(f"order {order_id}: before commit, {messages_for(tasks, result.id)} message(s) "
              "visible to workers")  # fmt: skip
        if not pay:
            raise PaymentDeclined(order_id, result)
    print(f"order {order_id} committed with its task")
    return order_id, result


with database() as url, example(url) as tasks:
    with worker(url), tasks.connect() as conn:
        order_id, result = place_order(conn, tasks, "alice", pay=True)
        print(f"send_order_email({order_id}) = {result.get(timeout=TIMEOUT)}")

        try:
            place_order(conn, tasks, "bob", pay=False)
        except PaymentDeclined as exc:
            order_id, lost = exc.args
            print(f"order {order_id} rolled back: {messages_for(tasks, lost.id)} message(s) "
                  "for its task")  # fmt: skip

        order_id, result = place_order(conn, tasks, "carol", pay=True)
        print(f"send_order_email({order_id}) = {result.get(timeout=TIMEOUT)}")
    print(f"emails sent for orders: {emails_sent(tasks)}")
print("done")
sys.exit(0)
