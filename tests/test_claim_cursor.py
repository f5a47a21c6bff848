"""Where a consumer's claims start (pgbroker/broker/cursor.py).

A claim starts at the consumer's position in the queue's service order,
not at its start: under a long transaction (the xmin horizon pinned), the
index entries of every message claimed since cannot be removed, and a
claim from the start visits each one. These tests prove that the claims
skip them, and that no message is missed on the way: one committed after
a later one, one made ready again, one a failed claim left behind.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

import pgbroker
from pgbroker.broker import cursor
from pgbroker.broker.cursor import END, WHOLE_QUEUE, ClaimCursors
from tests.kombu_helpers import drain_quietly, drain_until

# --- the positions ----------------------------------------------------------------------


def test_a_publish_moves_the_position_back_to_its_message() -> None:
    c = ClaimCursors()
    assert c.start("q") == WHOLE_QUEUE
    c.claimed("q", [(0, 5), (0, 6)], limit=10)  # fewer than asked: the end
    assert c.notified("q\n0 4", {"q"})  # the place of its first message
    assert c.take_woken() == {"q"}
    assert c.start("q") == (0, 4)
    c.claimed("q", [(0, 4)], limit=1)  # a full claim: just after its last row
    assert c.start("q") == (0, 5)
    c.claimed("q", [], limit=1)
    # A higher priority comes first in service order.
    c.notified("q\n9 80", {"q"})
    c.notified("q\n0 70", {"q"})
    assert c.start("q") == (-9, 80)


def test_a_queue_name_alone_rescans_the_whole_queue() -> None:
    """A requeue, a recovery or a promotion NOTIFYs the queue's name: what
    it made ready may lie before the position."""
    c = ClaimCursors()
    c.start("q")
    c.claimed("q", [], limit=10)
    assert c.notified("q", {"q"})
    assert c.take_woken() == {"q"}
    assert c.start("q") == WHOLE_QUEUE
    c.claimed("q", [], limit=10)
    # A place after the name does not narrow it.
    c.notified("q", {"q"})
    c.notified("q\n0 4", {"q"})
    assert c.start("q") == WHOLE_QUEUE
    c.claimed("q", [], limit=10)
    # Another queue's notification does not touch this one.
    c.notified("q", {"q", "r"})
    c.notified("r\n0 4", {"q", "r"})
    assert c.start("q") == WHOLE_QUEUE
    assert c.start("r") == WHOLE_QUEUE  # never claimed from yet


def test_notifications_during_a_claim_are_kept() -> None:
    """A publish that commits after the claim's snapshot: its NOTIFY arrives
    while the claim runs, and moves the position set after it back."""
    c = ClaimCursors()
    c.start("q")
    c.claimed("q", [], limit=10)
    c.notified("q\n0 50", {"q"})
    assert c.start("q") == (0, 50)
    c.notified("q\n0 40", {"q"})  # committed after the snapshot
    c.claimed("q", [(0, 50), (0, 51)], limit=2)
    assert c.start("q") == (0, 40)
    c.notified("q", {"q"})  # a name alone during the claim
    c.claimed("q", [(0, 40)], limit=1)
    assert c.start("q") == WHOLE_QUEUE


def test_other_payloads_change_nothing() -> None:
    c = ClaimCursors()
    c.start("q")
    c.claimed("q", [], limit=10)
    assert not c.notified("other", {"q"})
    assert not c.notified("other\n0 4", {"q"})
    assert c.take_woken() == set()
    assert c.start("q") == END
    c.claimed("q", [], limit=10)
    # A malformed place: the whole queue, to be safe.
    assert c.notified("q\nx", {"q"})
    assert c.take_woken() == {"q"}
    assert c.start("q") == WHOLE_QUEUE
    c.claimed("q", [], limit=10)
    assert c.notified("q\n0 4 5 6", {"q"})
    assert c.take_woken() == {"q"}
    assert c.start("q") == WHOLE_QUEUE


def test_the_whole_queue_is_scanned_every_so_often(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    c = ClaimCursors()
    assert c.start("q") == WHOLE_QUEUE
    c.claimed("q", [(0, 5)], limit=1)
    now[0] += cursor.FULL_CLAIM_EVERY - 0.1
    assert c.start("q") == (0, 6)
    c.claimed("q", [(0, 6)], limit=1)
    now[0] += 0.2
    assert c.start("q") == WHOLE_QUEUE


# --- who claims at once -----------------------------------------------------------------


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """time.monotonic, set by the test."""
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    return now


def named_another() -> ClaimCursors:
    """Consumer 3's cursors, idle, after a publish named consumer 5."""
    c = ClaimCursors()
    c.start("q")
    c.claimed("q", [], limit=10)
    assert c.notified("q\n0 40 5", {"q"}, consumer_id=3)
    return c


def test_a_place_naming_another_consumer_wakes_this_one_only_after_the_fallback(
    clock: list[float],
) -> None:
    c = named_another()
    assert c.take_woken() == set()
    assert c.next_fallback() == 1000.0 + cursor.WAKE_FALLBACK
    # A later one does not put the fallback off.
    clock[0] += 0.5
    c.notified("q\n0 41 6", {"q"}, consumer_id=3)
    assert c.take_woken() == set()
    clock[0] += cursor.WAKE_FALLBACK - 0.5
    assert c.take_woken() == {"q"}
    assert c.next_fallback() is None
    assert c.start("q") == (0, 40)  # from the first place named


def test_a_claim_from_the_queue_makes_its_fallback_needless(clock: list[float]) -> None:
    c = named_another()
    assert c.start("q") == (0, 40)  # a claim for another reason covers it
    c.claimed("q", [], limit=10)
    clock[0] += cursor.WAKE_FALLBACK
    assert c.take_woken() == set()


def test_the_named_consumer_and_an_unnamed_place_wake_at_once() -> None:
    c = ClaimCursors()
    c.start("q")
    c.claimed("q", [], limit=10)
    c.notified("q\n0 40 3", {"q"}, consumer_id=3)
    assert c.take_woken() == {"q"}
    assert c.start("q") == (0, 40)
    c.claimed("q", [(0, 40)], limit=10)
    c.notified("q\n0 41", {"q"}, consumer_id=3)  # passed on by a consumer
    assert c.take_woken() == {"q"}
    # A name alone (a requeue) wakes everyone, as before.
    c.start("q")
    c.claimed("q", [], limit=10)
    c.notified("q", {"q"}, consumer_id=3)
    assert c.take_woken() == {"q"}


def test_a_place_named_for_this_consumer_that_it_cannot_take_is_passed_on(
    clock: list[float],
) -> None:
    c = ClaimCursors()
    c.start("q")
    c.claimed("q", [], limit=1)
    c.notified("q\n0 39 5", {"q"}, consumer_id=3)  # another consumer waits
    c.notified("q\n0 40 3", {"q"}, consumer_id=3)
    c.notified("q\n0 41 3", {"q"}, consumer_id=3)
    c.take_woken()
    c.start("q")
    # Full (a prefetch of 1) before the second place: where it stopped is
    # passed on, for the others to claim from.
    assert c.claimed("q", [(0, 39)], limit=1) == (0, 40)
    assert cursor.place_payload("q", (0, 40)) == "q\n0 40"
    # A claim that got less than it asked took all it could see.
    c.notified("q\n0 42 3", {"q"}, consumer_id=3)
    c.start("q")
    assert c.claimed("q", [], limit=1) is None
    # No room to claim at all: the first place named since.
    c.notified("q\n0 44 3", {"q"}, consumer_id=3)
    c.notified("q\n9 43 3", {"q"}, consumer_id=3)
    c.notified("q\n0 45 3", {"q"}, consumer_id=3)
    assert c.unserved("q") == (-9, 43)
    assert c.unserved("q") is None
    # No other consumer named lately: nobody to pass it on to.
    clock[0] += cursor.OTHERS_WAITED_WITHIN
    c.notified("q\n0 46 3", {"q"}, consumer_id=3)
    assert c.unserved("q") is None
    c.notified("q\n0 47 3", {"q"}, consumer_id=3)
    c.take_woken()
    c.start("q")
    assert c.claimed("q", [(0, 46)], limit=1) is None


# --- claims on a real queue -----------------------------------------------------------

#: Messages claimed (and acknowledged) while the xmin horizon is pinned.
BEFORE = 1500
#: Then claimed one at a time, each woken by its NOTIFY.
AFTER = 20


@pytest.fixture
def pinned(db_url: str) -> Iterator[None]:
    """A transaction that holds a snapshot: VACUUM, and the index scans
    that mark dead entries, may remove nothing committed after it began."""
    with psycopg.connect(db_url) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        conn.execute("SELECT 1")
        yield
        conn.rollback()


def entries_read(db_url: str, transport: Any) -> int:
    """Index entries the scans of message_ready returned so far (a dead one
    too: each costs a visit to the table). The consumer's session flushes
    its statistics first."""
    transport.conn.execute("SELECT pg_stat_force_next_flush()")
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT idx_tup_read FROM pg_stat_user_indexes"
            " WHERE schemaname = 'pgbroker' AND indexrelname = 'message_ready'"
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("whole_queue", [False, True], ids=["from-position", "whole-queue"])
def test_claims_do_not_visit_what_was_claimed_before(
    db_url: str, pinned: None, whole_queue: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the xmin horizon pinned, BEFORE messages are claimed and acked,
    then AFTER more, one at a time. From their position, those claims read
    a few index entries each; from the start of the queue (the control,
    every claim scanning the whole queue) each reads all BEFORE dead ones."""
    monkeypatch.setattr(cursor, "FULL_CLAIM_EVERY", 0.0 if whole_queue else 3600.0)
    got: list[int] = []
    with consuming(db_url, "pinned", take(got)) as (conn, publish):
        for i in range(BEFORE):
            publish(i)
        drain_until(conn, lambda: len(got) == BEFORE)
        read = entries_read(db_url, conn.transport)
        for i in range(BEFORE, BEFORE + AFTER):
            publish(i)
            drain_until(conn, lambda: got[-1:] == [i])  # noqa: B023 (called at once)
        read = entries_read(db_url, conn.transport) - read
    assert got == list(range(BEFORE + AFTER))
    if whole_queue:
        assert read >= AFTER * BEFORE
    else:
        assert read <= AFTER * 10


def test_a_message_committed_after_a_later_one_is_claimed_at_once(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message published in a transaction (pgbroker.enqueue_in) takes its
    id first and commits last: its NOTIFY moves the position back to it,
    with no whole-queue claim to find it."""
    monkeypatch.setattr(cursor, "FULL_CLAIM_EVERY", 3600.0)
    got: list[str] = []
    with (
        psycopg.connect(db_url) as app_conn,
        consuming(db_url, "late", take(got)) as (conn, publish),
    ):
        publish("first")
        drain_until(conn, lambda: got == ["first"])
        with pgbroker.enqueue_in(app_conn):
            publish("late")
        publish("later")
        drain_until(conn, lambda: got == ["first", "later"])
        app_conn.commit()
        started = time.monotonic()
        drain_until(conn, lambda: len(got) == 3, timeout=5)
        assert got[2] == "late"
        assert time.monotonic() - started < 1.0


def test_a_requeued_message_is_claimed_again_at_once(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message handed back keeps its id, before the position: the queue's
    name NOTIFYd alone sends the next claim over the whole queue."""
    monkeypatch.setattr(cursor, "FULL_CLAIM_EVERY", 3600.0)
    got: list[str] = []

    def on_message(body: str, message: Any) -> None:
        got.append(body)
        if len(got) == 1:
            message.requeue()
        else:
            message.ack()

    with consuming(db_url, "again", on_message) as (conn, publish):
        drain_quietly(conn, 0.2)  # the first claim: nothing yet
        publish("back")
        drain_until(conn, lambda: len(got) == 2, timeout=5)
    assert got == ["back", "back"]


def test_a_message_a_failed_claim_left_is_claimed_by_a_whole_queue_claim(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message that another claim had locked (SKIP LOCKED passes over it)
    is ready again, with no NOTIFY, when that claim rolls back. The claims
    from the position do not see it; the next whole-queue claim, at most
    FULL_CLAIM_EVERY later, does."""
    monkeypatch.setattr(cursor, "FULL_CLAIM_EVERY", 3600.0)
    got: list[str] = []
    with consuming(db_url, "left", take(got)) as (conn, publish):
        with psycopg.connect(db_url) as locker:
            publish("left")
            locker.execute(
                "SELECT id FROM pgbroker.message WHERE queue = 'left' FOR UPDATE"
            ).fetchall()
            drain_quietly(conn, 0.3)  # its claim passes over it
            assert got == []
            locker.rollback()
        publish("first")
        drain_until(conn, lambda: "first" in got)
        assert got == ["first"]  # from the position: not seen
        monkeypatch.setattr(cursor, "FULL_CLAIM_EVERY", 0.0)  # time for a whole one
        publish("second")
        drain_until(conn, lambda: len(got) == 3, timeout=5)
    assert sorted(got) == ["first", "left", "second"]


@contextlib.contextmanager
def consuming(db_url: str, name: str, callback: Any) -> Iterator[tuple[Connection, Any]]:
    """A consumer of a new queue ``name`` (prefetch 100), and a function
    that publishes a body to it from another connection."""
    queue = Queue(name, Exchange(name), name)
    with Connection(db_url) as conn, Connection(db_url) as pub:
        producer = Producer(pub.channel())
        queue(producer.channel).declare()
        channel = conn.channel()
        channel.basic_qos(0, 100, False)
        with Consumer(channel, [queue], callbacks=[callback]):
            yield (
                conn,
                lambda body: producer.publish(body, exchange=queue.exchange, routing_key=name),
            )


def take(got: list[Any]) -> Any:
    """A consumer callback: keep the body, ack the message."""

    def on_message(body: Any, message: Any) -> None:
        got.append(body)
        message.ack()

    return on_message
