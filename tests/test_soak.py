"""Soak: tables and indexes stay bounded while messages flow and history is pruned.

Each round pushes messages through pgbroker with real consumers and the
history that comes with them:

* ``MESSAGES`` Kombu messages published by two producer threads and
  consumed (acked) by a Kombu consumer; a few are rejected (dead letters);
* a consumer process that claims messages is SIGKILLed, so the sweep
  redelivers them (redelivery log);
* ``TASKS`` Celery tasks run by a real ``celery worker`` with pgbroker as
  broker and result backend (``task_result`` rows, expired by the backend);
* then ``pgbroker.operations.retention.prune`` removes the history, and a
  ``VACUUM`` (what autovacuum does) makes the freed space reusable.

After every round the test prints ``pg_total_relation_size`` of each table
(indexes included) and checks that sizes stop growing: from round 2 on, no
round's size exceeds round 2's by more than ``FACTOR``. (Round 2, not round
1, is the reference: B-tree pages emptied in round 1 become reusable only
after a later VACUUM, so indexes grow once, by about one round's worth, and
then stay put. The printed figures show it.)

The sizes are high-water marks: the test's VACUUM does not truncate empty
pages at the end of a table, and autovacuum is off for the test's tables
(the test vacuums them itself). A truncating VACUUM, the test's or
autovacuum's whenever it runs, cuts a table down to wherever its last
used page happens to be at that moment, which made round 2's size a matter
of timing (on PostgreSQL 18, with autovacuum on, the message table measured
5.1 MB, 720 KB, 1.18 MB, 1.19 MB: the same space, truncated once). Space
that is not reused grows a high-water mark; truncation cannot hide it.

Scale it with environment variables (the defaults keep it near a minute on
a 2-core machine): ``PGBROKER_SOAK_MESSAGES`` (per round, default 5000),
``PGBROKER_SOAK_TASKS`` (per round, default 300), ``PGBROKER_SOAK_ROUNDS``
(default 4, at least 3). Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kombu import Connection, Consumer, Producer, Queue

from pgbroker.database import queries
from pgbroker.operations import admin, retention
from tests.celery_helpers import celery_env, client_app, start_worker, wait_until
from tests.kombu_helpers import FAST, Child, drain_until, scalar
from tests.test_dedup import running

pytestmark = pytest.mark.slow

MESSAGES = int(os.environ.get("PGBROKER_SOAK_MESSAGES", "5000"))
TASKS = int(os.environ.get("PGBROKER_SOAK_TASKS", "300"))
ROUNDS = max(3, int(os.environ.get("PGBROKER_SOAK_ROUNDS", "4")))
#: A later round's size over round 2's, per table, at most.
FACTOR = 1.25
#: Tables this small can change by a few pages either way; below this the
#: ratio says nothing.
SLACK = 256 * 1024

#: The tables whose growth pgbroker itself (ack, sweep, backend expiry,
#: prune) is responsible for bounding within a round. (published_task, the
#: publish-dedup record, keeps one row per Celery task for the transport's
#: dedup_window, 1 hour by default, so it grows here by design; its size is
#: printed; test_published_task_stays_flat_at_peak_publish_rate bounds it.)
BOUNDED = (
    "message",
    "dead_letter",
    "redelivery",
    "task_result",
    "group_result",
    "chord",
    "chord_part",
    "consumer",
    "consumer_queue",
    "queue",
    "binding",
)

# A consumer that claims up to 200 messages, says so, and waits to be killed.
HOLDER = """
import os, sys, time
from kombu import Connection, Consumer, Queue
held = []
with Connection(os.environ["TEST_URL"], transport_options={"sweep_interval": 0.3}) as conn:
    ch = conn.channel()
    ch.basic_qos(0, 200, False)
    Consumer(ch, [Queue("soak")], callbacks=[lambda b, m: held.append(m)]).consume()
    while len(held) < 200:
        conn.drain_events(timeout=10)
    print("holding", flush=True)
    time.sleep(600)
"""


def _sizes(db: psycopg.Connection) -> dict[str, int]:
    return {
        r[0]: r[1]
        for r in db.execute(
            "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'pgbroker' AND c.relkind = 'r' ORDER BY 1"
        )
    }


def _publish(url: str, count: int, start: int) -> None:
    with Connection(url, transport_options=FAST) as conn:
        producer = Producer(conn.channel())
        payload = "x" * 200
        for i in range(start, start + count):
            producer.publish({"i": i, "pad": payload}, routing_key="soak")


def _round(url: str, db: psycopg.Connection, results_mod: Any) -> dict[str, float]:
    took: dict[str, float] = {}
    t0 = time.monotonic()
    # 1. Messages: two producers, then one consumer acking (a few rejected).
    #    Publishing first makes each round's backlog peak the same, so the
    #    rounds' sizes compare like with like.
    half = MESSAGES // 2
    producers = [
        threading.Thread(target=_publish, args=(url, half, 0)),
        threading.Thread(target=_publish, args=(url, MESSAGES - half, half)),
    ]
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    ready = db.execute("SELECT count(*) FROM pgbroker.message").fetchone()
    assert ready == (MESSAGES,), "a producer failed; see the warnings"

    # 2. A consumer holds 200 of them and is SIGKILLed: redeliveries.
    with Child(HOLDER, url) as holder:
        assert holder.read_line(timeout=60) == "holding"
        holder.kill()

    handled = [0]

    def on_message(body: Any, message: Any) -> None:
        handled[0] += 1
        if body["i"] % 1000 == 0:
            message.reject(requeue=False)  # -> dead_letter
        else:
            message.ack()

    with Connection(url, transport_options=FAST) as conn:
        channel = conn.channel()
        channel.basic_qos(0, 500, False)
        Consumer(channel, [Queue("soak")], callbacks=[on_message]).consume()
        # The killed holder's messages come back within a sweep or two.
        drain_until(conn, lambda: handled[0] >= MESSAGES, timeout=120)
    took["messages"] = time.monotonic() - t0
    t0 = time.monotonic()

    # 3. Celery tasks through a real worker, results in task_result.
    results = [results_mod.add.delay(i, i) for i in range(TASKS)]
    for i in range(max(0, TASKS - 20), TASKS):
        assert results[i].get(timeout=120) == 2 * i
    wait_until(
        lambda: db.execute("SELECT count(*) FROM pgbroker.message").fetchone() == (0,),
        120,
        "every message to be acked",
    )

    took["tasks"] = time.monotonic() - t0

    # 4. Prune everything older than a second, then vacuum as autovacuum would.
    time.sleep(1.1)  # on purpose: everything is older than the second kept
    t0 = time.monotonic()
    with admin.open_connection(url, "pgbroker") as conn:
        retention.prune(
            conn,
            "pgbroker",
            retention.Policy(
                redeliveries_older_than=timedelta(seconds=1),
                dead_letters_older_than=timedelta(seconds=1),
                results_older_than=timedelta(seconds=1),
                durable_idle_older_than=timedelta(seconds=1),
            ),
        )
    tables = ", ".join(f"pgbroker.{t}" for t in _sizes(db))
    db.execute(f"VACUUM (TRUNCATE false) {tables}")
    took["prune+vacuum"] = time.monotonic() - t0
    return took


def test_sizes_stay_bounded(
    db_url: str, db: psycopg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The results app reads these at import, in the worker and here.
    for name, value in (("RB_BROKER", db_url), ("RB_BACKEND", db_url), ("RB_EXPIRES", "60")):
        monkeypatch.setenv(name, value)
    env = celery_env(db_url)
    with Connection(db_url) as conn:
        Queue("soak")(conn.channel()).declare()
    for table in _sizes(db):  # the test's own database, its own tables
        db.execute(
            f"ALTER TABLE pgbroker.{table} "
            "SET (autovacuum_enabled = off, toast.autovacuum_enabled = off)"
        )
    history: list[dict[str, int]] = []
    started = time.monotonic()
    with (
        start_worker("tests.apps.results_app", env, tmp_path) as worker,
        client_app("tests.apps.results_app", db_url) as results_mod,
    ):
        worker.wait_for_log("ready.", timeout=60)
        for n in range(ROUNDS):
            t0 = time.monotonic()
            took = _round(db_url, db, results_mod)
            history.append(_sizes(db))
            phases = ", ".join(f"{k} {v:.1f} s" for k, v in took.items())
            print(
                f"\nround {n + 1}: {MESSAGES} messages, {TASKS} tasks in "
                f"{time.monotonic() - t0:.1f} s ({phases})"
            )
    counts = {t: db.execute(f"SELECT count(*) FROM pgbroker.{t}").fetchone() for t in BOUNDED}
    _print(history, time.monotonic() - started)
    print("rows left:", {t: c[0] for t, c in counts.items() if c and c[0]})

    reference = history[1]
    grown = {
        t: [h[t] for h in history]
        for t in BOUNDED
        if t in reference
        and max(h[t] for h in history[2:]) > max(reference[t] * FACTOR, reference[t] + SLACK)
    }
    assert not grown, f"tables kept growing after round 2: {grown}"
    # The history was pruned, not merely kept small.
    for table in ("redelivery", "dead_letter", "message"):
        assert counts[table] == (0,), table


def _print(history: list[dict[str, int]], seconds: float) -> None:
    tables = sorted(history[0])
    header = f"{'table':<16}" + "".join(f"{'round ' + str(i + 1):>12}" for i in range(len(history)))
    print(f"\npg_total_relation_size after prune + VACUUM ({seconds:.0f} s in all):")
    print(header)
    for t in tables:
        print(f"{t:<16}" + "".join(f"{h.get(t, 0):>12,}" for h in history))


#: published_task soak: a short window, so that rows age out within a round.
DEDUP_WINDOW = 3.0
DEDUP_ROUND_SECONDS = float(os.environ.get("PGBROKER_SOAK_DEDUP_SECONDS", "6"))


def test_published_task_stays_flat_at_peak_publish_rate(
    db_url: str, db: psycopg.Connection
) -> None:
    """Celery task messages published by a task run (as a chain's links are) as fast as
    one producer goes
    (the benchmark's peak publish rate: about 1,400 messages/s from one
    Kombu producer, 500-750 Celery tasks/s) with a short dedup_window, and
    consumed: the sweeper thread prunes published_task as fast as rows age
    out, so its row count stays near rate x (window + sweep_interval) and
    its size, after a VACUUM, stays flat from round 2 on."""
    options = {"dedup_window": DEDUP_WINDOW, "sweep_interval": 1.0}
    queue = Queue("soak-dedup")
    stop = threading.Event()
    published = [0]
    failed: list[BaseException] = []

    def publish() -> None:
        try:
            # Published inside a task run, as chain links are: only those
            # are recorded (a client's publications write no row).
            with Connection(db_url, transport_options=options) as conn:
                producer = Producer(conn.channel())  # connects: the schema's oid is known
                publish_loop(conn, producer)
        except BaseException as exc:  # reported by the test
            failed.append(exc)

    def publish_loop(conn: Connection, producer: Producer) -> None:
        with running(conn, 1):
            while not stop.is_set():
                headers = {"id": str(uuid.uuid4()), "task": "soak.t", "retries": 0}
                producer.publish({"pad": "x" * 100}, routing_key=queue.name, headers=headers)
                published[0] += 1

    rounds: list[tuple[float, int, int]] = []  # (rate, rows, bytes after VACUUM)
    with Connection(db_url, transport_options=options) as conn:
        queue(conn.channel()).declare()
        # High-water marks, as in test_sizes_stay_bounded: no truncating
        # VACUUM, autovacuum's or ours, cuts the reference round down to its
        # last used page of the moment (a CI run on PostgreSQL 18: 1.2 MB in
        # round 2, then 2.2 and 2.7 MB in rounds 3 and 4, both at 1,100/s).
        db.execute(
            "ALTER TABLE pgbroker.published_task "
            "SET (autovacuum_enabled = off, toast.autovacuum_enabled = off)"
        )
        consumer = Consumer(conn, [queue], callbacks=[lambda body, message: message.ack()])
        consumer.qos(prefetch_count=500)
        with consumer:
            own = conn.transport._sweeper
            assert own is not None
            drain_until(conn, own.covers, timeout=15)
            thread = threading.Thread(target=publish)
            thread.start()
            try:
                for _ in range(ROUNDS):
                    start, count = time.monotonic(), published[0]
                    end = start + DEDUP_ROUND_SECONDS

                    def round_over(end: float = end) -> bool:
                        return time.monotonic() >= end

                    drain_until(conn, round_over, 60)
                    rate = (published[0] - count) / (time.monotonic() - start)
                    rows = scalar(db, "SELECT count(*) FROM pgbroker.published_task")
                    db.execute("VACUUM (TRUNCATE false) pgbroker.published_task")
                    size = scalar(db, "SELECT pg_total_relation_size('pgbroker.published_task')")
                    rounds.append((rate, int(rows), int(size)))
            finally:
                stop.set()
                thread.join(30)
    assert not failed, failed
    print(f"\npublished_task, dedup_window {DEDUP_WINDOW:g} s, sweep_interval 1 s:")
    for n, (rate, rows, size) in enumerate(rounds, 1):
        print(f"round {n}: {rate:,.0f} tasks/s published, {rows:,} rows, {size:,} bytes")
    for rate, rows, _ in rounds:
        # Rows live the window, plus up to a sweep interval, plus a second
        # of slack for a loaded machine.
        assert rows <= rate * (DEDUP_WINDOW + 1.0 + 1.0) + 500, (rate, rows)
    # The table's size is the high-water mark of its live rows, which is
    # the publish rate times the window: a round published faster (CI's
    # load falls as other tests end: 380 tasks/s in round 1, 770 in round
    # 4 once) may hold proportionally more. So round 2's size is scaled by
    # the fastest rate so far against round 2's; at a steady rate the bound
    # is round 2's size times FACTOR, and a table that grows because
    # pruning falls behind still fails it.
    ref_rate, _, reference = rounds[1]
    for n in range(2, len(rounds)):
        scale = max(1.0, max(rate for rate, _, _ in rounds[: n + 1]) / ref_rate)
        size = rounds[n][2]
        assert size <= max(reference * scale * FACTOR, reference * scale + SLACK), rounds


#: Rows of the pruning backlog (three times what the old pruning could do
#: in one sweep: 21 batches of 5,000 per sweep_interval, about 10,000/s).
PRUNE_BACKLOG = 300_000


def test_pruning_keeps_up_far_above_the_peak_publish_rate(
    db_url: str, db: psycopg.Connection
) -> None:
    """A backlog of published_task rows past the window (as after a burst,
    or a shorter window) goes at 100,000 rows/s or so, with default
    settings (sweep_interval 10 s): the sweeper thread prunes in batches of
    5,000 for half a second, then half a second of waiting, until done.
    That is over 100 times the benchmark's peak publish rate."""
    backlog = (
        "INSERT INTO pgbroker.published_task (task_id, retries, source, exchange, "
        "routing_key, published_at) SELECT md5(i::text), 0, 'run ' || i, '', 'celery', "
        "now() - interval '2 hours' "
        "FROM generate_series(1, %s) i"
    )
    db.execute(backlog, [PRUNE_BACKLOG])
    db.execute("VACUUM ANALYZE pgbroker.published_task")
    count = "SELECT count(*) FROM pgbroker.published_task"
    with Connection(db_url) as conn:
        assert conn.transport.options.dedup_window == 3600.0
        assert conn.transport.options.sweep_interval == 10.0
        Consumer(conn, [Queue("idle")], callbacks=[lambda body, message: None]).consume()
        # The sweeper's first sweep starts the pruning.
        drain_until(conn, lambda: scalar(db, count) < PRUNE_BACKLOG, timeout=30)
        started = time.monotonic()
        drain_until(conn, lambda: scalar(db, count) == 0, timeout=60)
        took = time.monotonic() - started
    # The reference, on the machine as loaded as it is now: the same backlog
    # deleted in the same batches, back to back, by the test itself.
    db.execute(backlog, [PRUNE_BACKLOG])
    db.execute("VACUUM ANALYZE pgbroker.published_task")
    prune = queries.for_schema("pgbroker", "queries.sql")["prune_published"]
    started = time.monotonic()
    while db.execute(prune, {"window": 3600.0, "limit": 5000}).rowcount:
        pass
    direct = time.monotonic() - started
    rate = PRUNE_BACKLOG / took
    print(
        f"\npruned {PRUNE_BACKLOG:,} published_task rows in {took:.1f} s: {rate:,.0f} rows/s "
        f"(deleted back to back by the test: {direct:.1f} s)"
    )
    # Half of each second spent pruning: about twice the back-to-back time,
    # with room for a loaded machine (CI runs other tests beside this one).
    # The old pruning, 21 batches per sweep_interval (about 10,000 rows/s
    # whatever the server's speed), took over 20 s.
    assert took < min(18.0, max(10.0, 4 * direct)), (took, direct)
