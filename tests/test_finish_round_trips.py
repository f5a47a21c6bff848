"""Round trips of a task's finish (pgbroker/results/finishing.py).

The finish is pipelined: its ack, the messages it hands on and the result
go to the server in one batch, then COMMIT: two round trips however many
messages it holds. The first test fails if the statements go one by one
again (seven round trips here, one per statement with BEGIN and COMMIT);
the second, if a finish that must write nothing leaves anything behind;
the third, if a finish acknowledges another message that took its
message's id; the fourth, if a finish writes anything on another server
timeline than its message was claimed on; the last, if the backend's
fingerprint is never asked again after a server restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from celery import Celery, states
from kombu import Connection, Producer, Queue

from pgbroker.broker import finish
from pgbroker.broker.messages import CONSUMER_ID, DELIVERY_COUNT, PUBLISHED_AT, TIMELINE
from pgbroker.database.pools import close_app
from tests.test_reused_ids import give_its_id_to_another_message

QUEUE = "finish_round_trips"
TASK_ID = "finish-rt-1"
#: psycopg's generators that wait for a pipeline's replies (psycopg is
#: pinned: pyproject.toml; .ci/run runs this test on the newest release too).
REPLIES = {"BasePipeline._fetch_gen", "BasePipeline._sync_gen", "BasePipeline._exit_gen"}


@pytest.fixture
def app(db_url: str) -> Iterator[Celery]:
    app = Celery("t", broker=db_url, backend=db_url, set_as_current=False)
    yield app
    app.backend.result_consumer.stop()
    close_app(app)


def finish_a_run(
    app: Celery,
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
    consumer_shift: int = 0,
    before_finish: Callable[[int], None] | None = None,
    claimed_on_timeline: int | None = None,
) -> list[str]:
    """Deliver a message (acks_late), hold three messages its run hands on,
    and store the run's result with them; the finish's round trips. With
    ``consumer_shift``, the finish says another consumer holds the message;
    ``before_finish`` is called with the message's id before the finish;
    ``claimed_on_timeline``, the finish says the message was claimed on that
    server timeline (not the server's now, as after a failover)."""
    backend = app.backend
    with Connection(db_url) as conn:
        channel = conn.channel()
        queue = Queue(QUEUE)
        queue(channel).declare()
        producer = Producer(channel)
        producer.publish({"run": 1}, routing_key=QUEUE)
        delivered = queue(channel).get()
        assert delivered is not None
        props = delivered.properties
        handed_on: list[tuple[Any, dict[str, Any]]] = []

        def hold(transport: Any, params: dict[str, Any], _fingerprint: Any) -> bool:
            handed_on.append((transport, params))
            return True

        with monkeypatch.context() as m:
            m.setattr(finish, "hold", hold)
            for i in range(3):
                producer.publish({"i": i}, routing_key=QUEUE)
        assert len(handed_on) == 3
        held = finish.Held(
            TASK_ID,
            delivered.delivery_tag,
            props[CONSUMER_ID] + consumer_shift,
            props[DELIVERY_COUNT],
            props[PUBLISHED_AT],
            props[TIMELINE] if claimed_on_timeline is None else claimed_on_timeline,
            acks_late=True,
            messages=handed_on,
        )

        if before_finish is not None:
            before_finish(delivered.delivery_tag)
        waits: list[str] = []
        finishing: list[psycopg.Connection] = []
        real_run, real_wait = backend._run, psycopg.Connection.wait

        def run(fn: Any) -> Any:
            def on(conn: psycopg.Connection) -> Any:
                finishing.append(conn)
                try:
                    return fn(conn)
                finally:
                    finishing.remove(conn)

            return real_run(on)

        def wait(self: psycopg.Connection, gen: Any, *args: Any, **kwargs: Any) -> Any:
            # A round trip: a statement outside a pipeline, or a pipeline's
            # wait for replies (in a pipeline, a statement is only sent).
            if self in finishing and (self._pipeline is None or gen.__qualname__ in REPLIES):
                waits.append(gen.__qualname__)
            return real_wait(self, gen, *args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(backend, "_run", run)
            m.setattr(psycopg.Connection, "wait", wait)
            backend._finishing.held = held
            backend.store_result(TASK_ID, 42, states.SUCCESS)
    return waits


def bodies(db: psycopg.Connection) -> list[str]:
    rows = db.execute(
        "SELECT convert_from(body, 'utf8') FROM pgbroker.message WHERE queue = %s ORDER BY id",
        (QUEUE,),
    ).fetchall()
    return [b for (b,) in rows]


def test_a_finish_is_two_round_trips_whatever_it_holds(
    app: Celery, db_url: str, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits = finish_a_run(app, db_url, monkeypatch)
    assert waits == ["BasePipeline._fetch_gen", "BasePipeline._exit_gen"], waits
    assert app.AsyncResult(TASK_ID).get(timeout=10) == 42
    # The run's message acknowledged; the three handed on, in order.
    assert bodies(db) == ['{"i": 0}', '{"i": 1}', '{"i": 2}']


def test_a_finish_whose_message_is_held_elsewhere_writes_nothing(
    app: Celery, db_url: str, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    finish_a_run(app, db_url, monkeypatch, consumer_shift=1000)
    # Rolled back: no result, nothing handed on, the run's message kept.
    assert db.execute("SELECT count(*) FROM pgbroker.task_result").fetchone() == (0,)
    assert bodies(db) == ['{"run": 1}']
    # The backend's sessions are usable afterwards (none left in a transaction).
    app.backend.store_result("other", 7, states.SUCCESS)
    assert app.AsyncResult("other").get(timeout=10) == 7


def test_a_finish_leaves_alone_another_message_that_took_its_id(
    app: Celery, db_url: str, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that lost its last commits (an asynchronous standby
    promoted, tests/test_ha_failover.py) hands their ids out again: the
    run's message is gone, and its id names another message, published
    later and never delivered. The finish must find its message gone (with
    acks_late: finished already, nothing written), not remove the other
    one as if it were its own message back in its queue."""
    finish_a_run(
        app, db_url, monkeypatch, before_finish=lambda id_: give_its_id_to_another_message(db, id_)
    )
    assert bodies(db) == ['{"n": "another"}']
    assert db.execute("SELECT count(*) FROM pgbroker.task_result").fetchone() == (0,)


def test_a_finish_of_a_message_claimed_on_another_timeline_writes_nothing(
    app: Celery, db_url: str, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an asynchronous standby was promoted, a run claimed from the
    old primary may finish on the new one, whose history lacks the old
    primary's last commits: maybe the run's own work (its steps). Its
    finish must write nothing, so that the message is delivered again,
    rather than store a result and hand on the next link of work that no
    longer exists (tests/test_failover_acks.py makes a real failover)."""
    (now,) = db.execute("SELECT pgbroker.server_timeline()").fetchone() or (None,)
    assert isinstance(now, int)
    finish_a_run(app, db_url, monkeypatch, claimed_on_timeline=now - 1)
    assert db.execute("SELECT count(*) FROM pgbroker.task_result").fetchone() == (0,)
    assert bodies(db) == ['{"run": 1}']


def test_a_backend_fingerprint_that_no_longer_matches_is_asked_again(app: Celery) -> None:
    """The backend's fingerprint holds the server's start time: after a
    restart or a failover, deliveries carry a new origin. The backend's,
    asked once, would no longer match them, and every task of the process
    would finish the usual way (more commits) until it restarts. It is
    asked again when it differs, at most every ASK_AGAIN_AFTER seconds
    (a backend really elsewhere must not cost a statement per task)."""
    backend = app.backend
    now = finish.backend_origin(backend)
    assert now
    assert finish.backend_origin(backend, now) == now
    finish._finishers[backend][:] = ["before the restart", time.monotonic()]
    assert finish.backend_origin(backend, now) == "before the restart"  # not asked yet
    finish._finishers[backend][1] -= finish.ASK_AGAIN_AFTER
    assert finish.backend_origin(backend, now) == now
    # A fingerprint that matches is never asked again.
    asked = finish._finishers[backend][1]
    finish._finishers[backend][1] -= 10 * finish.ASK_AGAIN_AFTER
    assert finish.backend_origin(backend, now) == now
    assert finish._finishers[backend][1] == asked - 10 * finish.ASK_AGAIN_AFTER
