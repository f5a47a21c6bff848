"""pgbroker.database.pools.close_app: an app that is dropped leaves nothing behind
that breaks the next app on the same broker URL in the process."""

from __future__ import annotations

from celery import Celery

from pgbroker.database.pools import close_app


def test_next_app_on_the_same_url_publishes_after_close() -> None:
    # The URL is the key of Kombu's process-wide pools: one of this test's own.
    url = "memory://localhost/close-app-test"
    first = Celery("first", broker=url, set_as_current=False)
    with first.producer_or_acquire() as producer:
        producer.publish({"n": 1}, routing_key="close-app-test")
    close_app(first)

    # Celery's app.close() forgets the closed pool but Kombu's registry keeps
    # it: without close_app removing it, this raised "Acquire on closed pool".
    second = Celery("second", broker=url, set_as_current=False)
    try:
        with second.producer_or_acquire() as producer:
            producer.publish({"n": 2}, routing_key="close-app-test")
    finally:
        close_app(second)
