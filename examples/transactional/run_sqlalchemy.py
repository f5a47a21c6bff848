"""Transactional enqueue with SQLAlchemy (2.x, psycopg 3 dialect).

    python examples/transactional/run_sqlalchemy.py

The task is published on the Session's own connection, so it commits with
``session.commit()`` and disappears with ``session.rollback()``. Uses
PGBROKER_URL if set, else an embedded PostgreSQL.
"""

from __future__ import annotations

import sys

from common import TIMEOUT, database, emails_sent, example, messages_for, worker
from sqlalchemy import create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import pgbroker


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "shop_order"  # created by tasks.create_tables(), in the example's schema
    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str]


def place_order(session: Session, tasks, customer: str, pay: bool):  # type: ignore[no-untyped-def]
    order = Order(customer=customer)
    session.add(order)
    session.flush()  # INSERT now: the order gets its id, in the transaction
    order_id = order.id
    # The psycopg connection under the Session's transaction. (Passing the
    # Session itself, enqueue_in(session), does the same.)
    conn = session.connection().connection.driver_connection
    with pgbroker.enqueue_in(conn):
        result = tasks.send_order_email.delay(order_id)
    print(f"order {order_id}: before commit, {messages_for(tasks, result.id)} message(s) "
          "visible to workers")  # fmt: skip
    if pay:
        session.commit()
        print(f"order {order_id} committed with its task")
    else:
        session.rollback()
        print(f"order {order_id} rolled back: {messages_for(tasks, result.id)} message(s) "
              "for its task")  # fmt: skip
    return order_id, result


with database() as url, example(url) as tasks:
    engine = create_engine(
        "postgresql+psycopg://" + url.partition("://")[2],
        connect_args={"options": tasks.SEARCH_PATH},  # the example's tables
    )
    with worker(url):
        with Session(engine) as session:
            order_id, result = place_order(session, tasks, "alice", pay=True)
            print(f"send_order_email({order_id}) = {result.get(timeout=TIMEOUT)}")
        with Session(engine) as session:
            place_order(session, tasks, "bob", pay=False)
        with Session(engine) as session:
            order_id, result = place_order(session, tasks, "carol", pay=True)
            print(f"send_order_email({order_id}) = {result.get(timeout=TIMEOUT)}")
    engine.dispose()
    print(f"emails sent for orders: {emails_sent(tasks)}")
print("done")
sys.exit(0)
