"""Transactional enqueue with Django (4.2+, psycopg 3 backend).

    python examples/transactional/run_django.py

Inside ``transaction.atomic()``, ``enqueue_in(connection)`` publishes the
task on Django's own database connection: it commits with the block and
vanishes when the block raises. ``transaction.on_commit(lambda: ...delay())``
is no longer needed, and a crash between the commit and the on_commit hook
can no longer lose the task. Uses PGBROKER_URL if set, else an embedded
PostgreSQL.
"""

from __future__ import annotations

import sys

from common import TIMEOUT, database, emails_sent, example, messages_for, worker
from psycopg.conninfo import conninfo_to_dict

import pgbroker


class PaymentDeclined(Exception):
    pass


def setup_django(url: str, search_path: str) -> None:
    import django
    from django.conf import settings

    params = conninfo_to_dict("postgresql://" + url.partition("://")[2])
    settings.configure(
        INSTALLED_APPS=["shop"],
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",  # psycopg 3 when installed
                "NAME": params.pop("dbname", ""),
                "USER": params.pop("user", ""),
                "PASSWORD": params.pop("password", ""),
                "HOST": params.pop("host", ""),
                "PORT": params.pop("port", ""),
                # Other libpq parameters (sslmode...), and the example's tables first.
                "OPTIONS": {**params, "options": search_path},
            }
        },
        USE_TZ=True,
    )
    django.setup()


def place_order(tasks, customer: str, pay: bool):  # type: ignore[no-untyped-def]
    from django.db import connection, transaction
    from shop.models import Order

    with transaction.atomic():
        order = Order.objects.create(customer=customer)
        # Django's connection, unwrapped to its psycopg 3 connection.
        with pgbroker.enqueue_in(connection):
            result = tasks.send_order_email.delay(order.id)
        print(f"order {order.id}: before commit, {messages_for(tasks, result.id)} message(s) "
              "visible to workers")  # fmt: skip
        if not pay:
            raise PaymentDeclined(order.id, result)
    print(f"order {order.id} committed with its task")
    return order.id, result


with database() as url, example(url) as tasks:
    setup_django(url, tasks.SEARCH_PATH)
    with worker(url):
        order_id, result = place_order(tasks, "alice", pay=True)
        print(f"send_order_email({order_id}) = {result.get(timeout=TIMEOUT)}")
        try:
            place_order(tasks, "bob", pay=False)
        except PaymentDeclined as exc:
            order_id, lost = exc.args
            print(f"order {order_id} rolled back: {messages_for(tasks, lost.id)} message(s) "
                  "for its task")  # fmt: skip
        order_id, result = place_order(tasks, "carol", pay=True)
        print(f"send_order_email({order_id}) = {result.get(timeout=TIMEOUT)}")
    from django.db import connection

    connection.close()
    print(f"emails sent for orders: {emails_sent(tasks)}")
print("done")
sys.exit(0)
