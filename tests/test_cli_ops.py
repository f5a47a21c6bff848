"""The operator commands (status, top, purge, dead-letters, tasks).

Details through pgbroker.operations.admin's functions; every command also runs at
least once as a real ``python -m pgbroker`` subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from celery import Celery
from celery.app.task import Context
from kombu import Consumer, Exchange, Message, Producer, Queue

from pgbroker.broker.messages import CONSUMER_ID, PUBLISHED_AT, RECEIVED_AT
from pgbroker.cli.status import rates
from pgbroker.errors import NotFound, SchemaError
from pgbroker.operations import admin
from tests import kombu_helpers as kh
from tests.celery_helpers import with_password

SECRET = "Sekr1t-ops-55qz"
EXCHANGE = Exchange("ops", type="direct")


def run(
    *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PGBROKER_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pgbroker", *args],
        capture_output=True,
        text=True,
        env=full_env,
        input=stdin,
        timeout=60,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pgbroker: error: ")
    assert SECRET not in result.stderr
    return lines[0]


@pytest.fixture
def url(db_url: str) -> str:
    """db_url with a password in it (the local server ignores it)."""
    return with_password(db_url, SECRET)[0]


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    with admin.open_connection(db_url, "pgbroker") as c:
        yield c


def declare(url: str, *names: str) -> None:
    with kh.connect(url) as c:
        ch = c.channel()
        for name in names:
            Queue(name, EXCHANGE, routing_key=name)(ch).declare()


def publish(url: str, queue: str, n: int, **kw: Any) -> None:
    with kh.connect(url) as c:
        producer = Producer(c.channel(), exchange=EXCHANGE)
        for i in range(n):
            producer.publish({"i": i}, routing_key=queue, **kw)


def reject_all(url: str, queue: str, n: int) -> list[Message]:
    """Publish n messages to queue, consume and reject them: n dead letters."""
    declare(url, queue)
    publish(url, queue, n)
    got: list[Message] = []
    with (
        kh.connect(url) as c,
        Consumer(
            c.channel(), [Queue(queue, EXCHANGE, routing_key=queue)], callbacks=[kh.collect(got)]
        ),
    ):
        kh.drain_until(c, lambda: len(got) >= n)
        for m in got:
            m.reject(requeue=False)
    return got


def dead_ids(db: psycopg.Connection, queue: str | None = "*") -> list[int]:
    """Dead letter ids of ``queue`` (None: those without a queue; "*": all)."""
    if queue == "*":
        return [r[0] for r in db.execute("SELECT id FROM pgbroker.dead_letter ORDER BY id")]
    query = "SELECT id FROM pgbroker.dead_letter WHERE queue IS NOT DISTINCT FROM %s ORDER BY id"
    return [r[0] for r in db.execute(query, [queue])]


# --- help, errors --------------------------------------------------------------------


def test_help_names_commands_and_environment() -> None:
    top = run("--help")
    assert top.returncode == 0
    for name in ("status", "top", "purge", "dead-letters", "tasks"):
        assert name in top.stdout
    env = {"PGBROKER_URL": f"postgresql://u:{SECRET}@h/d"}
    for cmd in (
        ["status"],
        ["top"],
        ["purge"],
        ["dead-letters", "list"],
        ["dead-letters", "replay"],
        ["dead-letters", "drop"],
        ["tasks"],
    ):
        result = run(*cmd, "--help", env=env)
        assert result.returncode == 0, result
        text = " ".join(result.stdout.split())
        assert "[env: PGBROKER_URL]" in text and "[env: PGBROKER_SCHEMA]" in text, cmd
        assert SECRET not in result.stdout
        assert "--json" in text, cmd


def test_errors_are_one_line(empty_db_url: str, pg_admin_url: str) -> None:
    # A database without the schema: say so, and how to fix it.
    line = one_line_error(run("status", "--url", with_password(empty_db_url, SECRET)[0]))
    assert "has no pgbroker schema 'pgbroker'" in line and "--schema" in line
    line = one_line_error(run("tasks", "--url", f"postgresql://u:{SECRET}@127.0.0.1:1/x"))
    assert "is PostgreSQL running" in line
    line = one_line_error(run("top", "--iterations", "1"))
    assert "no database URL" in line
    line = one_line_error(run("dead-letters", "replay", "--url", empty_db_url))
    assert "or pass --all" in line
    line = one_line_error(run("dead-letters", "drop", "1", "--all", "--url", empty_db_url))
    assert "not both" in line


def test_parse_duration() -> None:
    assert admin.parse_duration("90s") == timedelta(seconds=90)
    assert admin.parse_duration("1h30m") == timedelta(minutes=90)
    assert admin.parse_duration("2d") == timedelta(days=2)
    assert admin.parse_duration("0.5h") == timedelta(minutes=30)
    for bad in ("", "5", "5x", "h", "1h 2"):
        with pytest.raises(ValueError, match="invalid duration"):
            admin.parse_duration(bad)


# --- status and top ---------------------------------------------------------------


def test_status(url: str, db_url: str, conn: psycopg.Connection, db: psycopg.Connection) -> None:
    declare(db_url, "a", "b", "c", "celeryev.x1")
    publish(db_url, "a", 3)
    publish(db_url, "b", 2)
    publish(db_url, "nowhere", 1)  # persistent, unroutable: dead letter without a queue
    reject_all(db_url, "c", 1)
    # One of a's messages (the last, not the one the consumer below claims)
    # has waited an hour; one of b's is delayed.
    db.execute(
        "UPDATE pgbroker.message SET published_at = now() - interval '1 hour' "
        "WHERE id = (SELECT max(id) FROM pgbroker.message WHERE queue = 'a')"
    )
    db.execute(
        "UPDATE pgbroker.message SET state = 'delayed', visible_at = now() + interval '1 hour' "
        "WHERE id = (SELECT min(id) FROM pgbroker.message WHERE queue = 'b')"
    )
    # Redeliveries: one recent, one too old to count.
    db.execute(
        "INSERT INTO pgbroker.redelivery (at, reason, message_id, queue, delivery_count) "
        "VALUES (now(), 'consumer died', 1, 'a', 1), "
        "(now() - interval '2 hours', 'consumer died', 2, 'a', 1)"
    )
    # Results: two successes and a failure just now, one success long ago.
    app = Celery("t", broker="memory://", backend=db_url, set_as_current=False)
    try:
        app.backend.mark_as_done("r1", 1)
        app.backend.mark_as_done("r2", 2)
        app.backend.mark_as_failure("r3", ValueError("x"))
        app.backend.mark_as_done("r0", 0)
    finally:
        app.close()
    db.execute(
        "UPDATE pgbroker.task_result SET date_done = now() - interval '2 hours' "
        "WHERE task_id = 'r0'"
    )

    received: list[Message] = []
    # No sweeper thread: it would remove the ghost consumer below in ~0.2 s.
    with kh.connect(db_url, fast_recovery=False) as live:
        queue_a = Queue("a", EXCHANGE, routing_key="a")
        with Consumer(
            live.channel(), [queue_a], callbacks=[kh.collect(received)], prefetch_count=1
        ):
            kh.drain_until(live, lambda: received)
            # A consumer whose session is gone: its row has no advisory lock.
            ghost = kh.scalar(
                db,
                "INSERT INTO pgbroker.consumer (hostname, pid) VALUES ('ghost', 4242) RETURNING id",
            )
            db.execute(
                "INSERT INTO pgbroker.consumer_queue (consumer_id, queue) VALUES (%s, 'b')",
                [ghost],
            )

            status = admin.status(conn, "pgbroker")
            by_name = {q.name: q for q in status.queues}
            assert list(by_name) == ["a", "b", "c", None]  # celeryev.* hidden
            assert status.hidden_queues == 1
            a, b, c, nowhere = by_name["a"], by_name["b"], by_name["c"], by_name[None]
            assert (a.ready, a.reserved, a.delayed, a.dead_lettered, a.consumers) == (2, 1, 0, 0, 1)
            assert a.oldest_ready_age is not None and 3500 < a.oldest_ready_age < 3700
            assert (b.ready, b.reserved, b.delayed, b.consumers) == (1, 0, 1, 1)
            assert b.oldest_ready_age is not None and b.oldest_ready_age < 600
            assert (c.ready, c.dead_lettered, c.oldest_ready_age) == (0, 1, None)
            assert (nowhere.dead_lettered, nowhere.declared) == (1, False)

            live_c, dead_c = status.consumers
            assert live_c.alive and live_c.queues == ["a"] and live_c.reserved == 1
            assert live_c.pid == os.getpid()
            assert (dead_c.id, dead_c.alive, dead_c.queues, dead_c.hostname) == (
                ghost,
                False,
                ["b"],
                "ghost",
            )

            act = status.activity
            assert act.redeliveries_last_hour == 1
            assert act.redeliveries_by_reason == {"consumer died": 1}
            assert act.dead_lettered_last_hour == 2
            assert act.messages_stored_total == 6  # 3 + 2 + 1 (c); unroutable is not stored
            assert act.messages_present == 5
            assert act.results is not None
            assert (act.results.last_minute, act.results.last_hour) == (3, 3)
            assert act.results.by_state_last_hour == {"FAILURE": 1, "SUCCESS": 2}

            assert [q.name for q in admin.status(conn, "pgbroker", all_queues=True).queues] == [
                "a",
                "b",
                "c",
                "celeryev.x1",
                None,
            ]

            # The same through the command, with the password in the URL.
            text = run("status", "--url", url)
            assert text.returncode == 0, text
            assert SECRET not in text.stdout + text.stderr
            lines = text.stdout.splitlines()
            assert lines[0].startswith("pgbroker status: schema 'pgbroker' in postgres@")
            assert any(line.split()[:6] == ["a", "2", "1", "0", "0", "1h00m"] for line in lines)
            assert any(line.startswith("(no queue)") for line in lines)
            assert "(1 Celery pidbox/event queue not shown: --all-queues)" in lines
            assert any("ghost" in line and "NO (session gone" in line for line in lines)
            assert "redeliveries in the last hour: 1 (consumer died 1)" in text.stdout
            assert "3 in the last minute" in text.stdout

            as_json = run("status", "--json", "--all-queues", env={"PGBROKER_URL": url})
            assert as_json.returncode == 0, as_json
            data = json.loads(as_json.stdout)
            assert [q["name"] for q in data["queues"]] == ["a", "b", "c", "celeryev.x1", None]
            assert [c["alive"] for c in data["consumers"]] == [True, False]
            assert data["activity"]["results"]["by_state_last_hour"]["SUCCESS"] == 2


def test_status_other_schema(empty_db_url: str) -> None:
    assert run("migrate", "--url", empty_db_url, "--schema", "jobs").returncode == 0
    declare_url = empty_db_url
    with kh.connect(declare_url, schema="jobs") as c:
        Queue("j1", EXCHANGE, routing_key="j1")(c.channel()).declare()
    result = run("status", "--json", env={"PGBROKER_URL": empty_db_url, "PGBROKER_SCHEMA": "jobs"})
    assert result.returncode == 0, result
    assert [q["name"] for q in json.loads(result.stdout)["queues"]] == ["j1"]
    line = one_line_error(run("status", "--url", empty_db_url))
    assert "no pgbroker schema 'pgbroker'" in line


def test_rates_between_samples(db_url: str, conn: psycopg.Connection) -> None:
    declare(db_url, "r")
    before = admin.status(conn, "pgbroker")
    publish(db_url, "r", 10)
    got: list[Message] = []
    with (
        kh.connect(db_url) as c,
        Consumer(
            c.channel(),
            [Queue("r", EXCHANGE, routing_key="r")],
            callbacks=[kh.collect(got)],
            prefetch_count=4,
        ),
    ):
        kh.drain_until(c, lambda: len(got) >= 4)
        for m in got[:4]:
            m.ack()
    after = admin.status(conn, "pgbroker")
    speed = rates(before, after)
    assert speed is not None
    assert round(speed.stored * speed.seconds) == 10
    assert round(speed.removed * speed.seconds) == 4


def test_top(url: str, db_url: str) -> None:
    declare(db_url, "t")
    publish(db_url, "t", 2)
    result = run("top", "--url", url, "--interval", "0.2", "--iterations", "2")
    assert result.returncode == 0, result
    assert result.stdout.count("pgbroker top: schema 'pgbroker'") == 2
    assert "\x1b[" not in result.stdout  # no terminal: frames, not redraws
    first, second = result.stdout.split("\npgbroker top:")
    assert "(rates appear from the next refresh)" in first
    assert "messages stored: 0.0/s" in second
    assert SECRET not in result.stdout

    lines = run("top", "--url", url, "--json", "--interval", "0.1", "--iterations", "2")
    assert lines.returncode == 0, lines
    frames = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [f["rates"] is None for f in frames] == [True, False]
    assert frames[1]["queues"][0]["ready"] == 2

    # Until Ctrl-C, which ends it quietly.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGBROKER_")}
    with subprocess.Popen(
        [sys.executable, "-m", "pgbroker", "top", "--url", url, "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:  # closes the pipes
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith("pgbroker top:")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=20) == 0
            assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


# --- purge ------------------------------------------------------------------------


def test_purge(url: str, db_url: str, conn: psycopg.Connection, db: psycopg.Connection) -> None:
    declare(db_url, "p", "other")
    publish(db_url, "p", 5)
    publish(db_url, "other", 2)
    db.execute(
        "UPDATE pgbroker.message SET state = 'delayed' "
        "WHERE id = (SELECT min(id) FROM pgbroker.message WHERE queue = 'p')"
    )
    received: list[Message] = []
    with (
        kh.connect(db_url) as c,
        Consumer(
            c.channel(),
            [Queue("p", EXCHANGE, routing_key="p")],
            callbacks=[kh.collect(received)],
            prefetch_count=1,
        ),
    ):
        kh.drain_until(c, lambda: received)
        assert admin.ready_count(conn, "pgbroker", "p") == 3

        def states() -> list[tuple[str, str, int]]:
            return kh.rows(
                db,
                "SELECT queue, state, count(*)::int FROM pgbroker.message "
                "GROUP BY 1, 2 ORDER BY 1, 2",
            )

        # Declined, then confirmed on stdin.
        no = run("purge", "p", "--url", url, stdin="n\n")
        assert no.returncode == 1, no
        assert "Delete 3 ready messages from queue 'p'" in no.stderr
        assert "not confirmed" in no.stderr
        assert admin.ready_count(conn, "pgbroker", "p") == 3
        yes = run("purge", "p", "--url", url, stdin="y\n")
        assert yes.returncode == 0, yes
        assert yes.stdout == "purged 3 ready messages from queue 'p'\n"
        assert SECRET not in yes.stdout + yes.stderr
        # The reserved and the delayed message stay, and so does the other queue.
        assert states() == [("other", "ready", 2), ("p", "delayed", 1), ("p", "reserved", 1)]
        received[0].ack()

    # Nothing left: no question asked.
    again = run("purge", "p", "--url", url, "--json")
    assert again.returncode == 0, again
    assert json.loads(again.stdout) == {"queue": "p", "purged": 0}
    assert admin.purge(conn, "pgbroker", "other") == 2
    with pytest.raises(NotFound, match="no queue named 'zz'"):
        admin.purge(conn, "pgbroker", "zz")
    line = one_line_error(run("purge", "zz", "--yes", "--url", url))
    assert "no queue named 'zz' in schema 'pgbroker'" in line


# --- dead letters -----------------------------------------------------------------


def test_dead_letters_list(url: str, db_url: str, conn: psycopg.Connection) -> None:
    reject_all(db_url, "d1", 3)
    reject_all(db_url, "d2", 1)
    publish(db_url, "nowhere", 1)

    page = admin.list_dead_letters(conn, "pgbroker")
    assert page.total == 5
    assert [(d.reason, d.queue) for d in page.items] == [
        ("unroutable", None),
        ("rejected", "d2"),
        ("rejected", "d1"),
        ("rejected", "d1"),
        ("rejected", "d1"),
    ]
    assert [d.id for d in page.items] == sorted((d.id for d in page.items), reverse=True)
    first = page.items[-1]
    assert (first.exchange, first.routing_key, first.delivery_count) == ("ops", "d1", 1)
    assert first.body_size == len(b'{"i": 0}')
    page = admin.list_dead_letters(conn, "pgbroker", queue="d1", limit=2)
    assert (len(page.items), page.total) == (2, 3)
    assert admin.list_dead_letters(conn, "pgbroker", reason="unroutable").total == 1
    assert admin.list_dead_letters(conn, "pgbroker", queue="none").total == 0

    text = run("dead-letters", "list", "--url", url, "--queue", "d1", "--limit", "2")
    assert text.returncode == 0, text
    lines = text.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "DIED", "REASON", "QUEUE"]
    assert len(lines) == 4 and lines[-1] == "(2 newest of 3: --limit to see more)"
    data = json.loads(run("dead-letters", "list", "--json", "--url", url).stdout)
    assert data["total"] == 5 and data["items"][0]["reason"] == "unroutable"


def test_replayed_message_is_consumed_intact(url: str, db_url: str, db: psycopg.Connection) -> None:
    declare(db_url, "work")
    headers = {"id": "task-77", "task": "app.work", "custom": {"nested": [1, "two", None]}}
    with kh.connect(db_url) as c:
        Producer(c.channel(), exchange=EXCHANGE).publish(
            {"text": "héllo", "n": [1, 2, 3]},
            routing_key="work",
            headers=headers,
            priority=7,
            correlation_id="corr-1",
            reply_to="replies",
        )
    original: list[Message] = []
    with (
        kh.connect(db_url) as c,
        Consumer(
            c.channel(),
            [Queue("work", EXCHANGE, routing_key="work")],
            callbacks=[kh.collect(original)],
        ),
    ):
        kh.drain_until(c, lambda: original)
        original[0].reject(requeue=False)
    (dead_id,) = dead_ids(db, "work")

    # A consumer waits on the queue with sweeps and polls far away: only the
    # replay's NOTIFY can wake it in time.
    ready = threading.Event()
    replayed: list[Message] = []
    got_at: list[float] = []
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            with kh.connect(db_url, sweep_interval=60, polling_interval=60) as c:
                queue = Queue("work", EXCHANGE, routing_key="work")

                def on_message(body: Any, message: Message) -> None:
                    got_at.append(time.monotonic())
                    replayed.append(message)
                    message.ack()

                with Consumer(c.channel(), [queue], callbacks=[on_message]):
                    ready.set()
                    kh.drain_until(c, lambda: replayed, timeout=30)
        except BaseException as exc:
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    try:
        assert ready.wait(15)
        # Its first claim is done (so the replayed message can only come
        # through the NOTIFY): its session is idle after the claim.
        kh.wait_for(
            lambda: kh.scalar(
                db,
                "SELECT count(*) FROM pgbroker.consumer_queue q"
                " JOIN pgbroker.consumer c ON c.id = q.consumer_id"
                " JOIN pg_stat_activity a ON a.pid = c.backend_pid"
                " WHERE a.state = 'idle'"
                " AND starts_with(a.query, '/* pgbroker claim */')",
            ),
            15,
        )
        result = run("dead-letters", "replay", str(dead_id), "--url", url)
        done = time.monotonic()
        assert result.returncode == 0, result
        assert result.stdout == "replayed 1 dead letter (1 to 'work')\n"
        thread.join(30)
    finally:
        thread.join(5)
    assert not errors, errors
    assert replayed and got_at[0] - done < 5

    before, after = original[0], replayed[0]
    assert after.body == before.body
    assert after.decode() == {"text": "héllo", "n": [1, 2, 3]}
    assert after.headers == before.headers == headers
    assert (after.content_type, after.content_encoding) == (
        before.content_type,
        before.content_encoding,
    )
    # Of the delivery, not the message: its row (id, published again), the
    # consumer holding it and when it claimed it.
    skip = {"delivery_tag", "delivery_info", CONSUMER_ID, PUBLISHED_AT, RECEIVED_AT}
    assert {k: v for k, v in after.properties.items() if k not in skip} == {
        k: v for k, v in before.properties.items() if k not in skip
    }
    assert after.properties["correlation_id"] == "corr-1"
    assert after.properties["reply_to"] == "replies"
    assert after.delivery_info["priority"] == 7
    assert after.delivery_info["redelivered"] is False  # a fresh start
    assert dead_ids(db, "*") == []
    assert kh.scalar(db, "SELECT count(*) FROM pgbroker.message") == 0


def test_replay_keeps_what_has_nowhere_to_go(
    url: str, db_url: str, conn: psycopg.Connection, db: psycopg.Connection
) -> None:
    reject_all(db_url, "gone", 2)
    reject_all(db_url, "stays", 1)
    fan = Exchange("fan", type="fanout")
    with kh.connect(db_url) as c:
        Producer(c.channel(), exchange=fan).publish({"f": 1}, routing_key="")  # no queue yet
        Producer(c.channel(), exchange=EXCHANGE).publish({"u": 1}, routing_key="late")
    with kh.connect(db_url) as c:
        ch = c.channel()
        Queue("gone", EXCHANGE, routing_key="gone")(ch).delete()
        for name in ("f1", "f2"):
            Queue(name, fan)(ch).declare()  # bound now: the fanout letter has queues
    gone = dead_ids(db, "gone")
    (stays,) = dead_ids(db, "stays")
    fan_id, late_id = dead_ids(db, None)

    result = admin.replay_dead_letters(conn, "pgbroker", [*gone, stays, fan_id, late_id, 999])
    assert result.replayed == 2
    assert result.messages == {"stays": 1, "f1": 1, "f2": 1}
    assert [(k.id, k.why) for k in result.kept] == [
        (gone[0], "its queue 'gone' no longer exists (declare it, then replay again)"),
        (gone[1], "its queue 'gone' no longer exists (declare it, then replay again)"),
        (late_id, "unroutable: no queue is bound to exchange 'ops' for key 'late'"),
    ]
    assert result.not_found == [999]
    assert dead_ids(db, "*") == [*gone, late_id]
    assert kh.rows(db, "SELECT queue, body FROM pgbroker.message ORDER BY queue") == [
        ("f1", b'{"f": 1}'),
        ("f2", b'{"f": 1}'),
        ("stays", b'{"i": 0}'),
    ]

    # Through the command: kept ones are reported, exit status 1.
    cli = run("dead-letters", "replay", "--all", "--url", url)
    assert cli.returncode == 1, cli
    assert cli.stdout.splitlines() == [
        "replayed 0 dead letters",
        f"kept #{gone[0]}: its queue 'gone' no longer exists (declare it, then replay again)",
        f"kept #{gone[1]}: its queue 'gone' no longer exists (declare it, then replay again)",
        f"kept #{late_id}: unroutable: no queue is bound to exchange 'ops' for key 'late'",
    ]
    # Once the queue is back, they go.
    declare(db_url, "gone")
    cli = run("dead-letters", "replay", "--all", "--queue", "gone", "--json", "--url", url)
    assert cli.returncode == 0, cli
    assert json.loads(cli.stdout) == {
        "replayed": 2,
        "messages": {"gone": 2},
        "kept": [],
        "not_found": [],
    }
    assert dead_ids(db, "*") == [late_id]


def _many_dead_letters(db: psycopg.Connection, queue: str, n: int) -> None:
    db.execute(
        "INSERT INTO pgbroker.dead_letter (reason, queue, delivery_count, published_at, "
        "exchange, routing_key, priority, content_type, content_encoding, headers, "
        "properties, body) "
        "SELECT 'rejected', %s, 1, now(), 'ops', %s, 0, 'application/json', 'utf-8', "
        "jsonb_build_object('n', g), '{}'::jsonb, convert_to(g::text, 'UTF8') "
        "FROM generate_series(1, %s) g",
        [queue, queue, n],
    )


def test_large_replay_shows_progress_and_keeps_order(
    url: str, db_url: str, db: psycopg.Connection
) -> None:
    declare(db_url, "big")
    _many_dead_letters(db, "big", 1200)
    result = run(
        "dead-letters", "replay", "--all", "--queue", "big", "--batch-size", "500", "--url", url
    )
    assert result.returncode == 0, result
    assert result.stdout == "replayed 1200 dead letters (1200 to 'big')\n"
    assert result.stderr.splitlines() == [
        "replayed 500 of 1200",
        "replayed 1000 of 1200",
        "replayed 1200 of 1200",
    ]
    bodies = [bytes(r[0]) for r in kh.rows(db, "SELECT body FROM pgbroker.message ORDER BY id")]
    assert bodies == [str(i).encode() for i in range(1, 1201)]


def test_concurrent_replays_never_duplicate(db_url: str, db: psycopg.Connection) -> None:
    declare(db_url, "race")
    _many_dead_letters(db, "race", 1000)
    results: list[admin.ReplayResult] = []
    errors: list[BaseException] = []

    def replay() -> None:
        try:
            with admin.open_connection(db_url, "pgbroker") as c:
                results.append(admin.replay_dead_letters(c, "pgbroker", batch_size=50))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=replay) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sum(r.replayed for r in results) == 1000
    assert all(not r.kept for r in results)
    assert kh.scalar(db, "SELECT count(*) FROM pgbroker.message") == 1000
    assert kh.scalar(db, "SELECT count(DISTINCT body) FROM pgbroker.message") == 1000
    assert kh.scalar(db, "SELECT count(*) FROM pgbroker.dead_letter") == 0


def test_drop(url: str, db_url: str, conn: psycopg.Connection, db: psycopg.Connection) -> None:
    reject_all(db_url, "x1", 3)
    reject_all(db_url, "x2", 2)
    x1, x2 = dead_ids(db, "x1"), dead_ids(db, "x2")

    no = run("dead-letters", "drop", str(x1[0]), "--url", url, stdin="no\n")
    assert no.returncode == 1 and "Drop 1 dead letter for good" in no.stderr
    assert dead_ids(db, "*") == [*x1, *x2]

    yes = run("dead-letters", "drop", str(x1[0]), "12345", "--url", url, stdin="yes\n")
    assert yes.returncode == 1, yes  # one of the two was not found
    assert yes.stdout.splitlines() == ["dropped 1 dead letter", "not found: #12345"]
    assert dead_ids(db, "*") == [*x1[1:], *x2]

    result = admin.drop_dead_letters(conn, "pgbroker", queue="x2")
    assert (result.dropped, result.not_found) == (2, [])
    cli = run("dead-letters", "drop", "--all", "--yes", "--json", "--url", url)
    assert cli.returncode == 0, cli
    assert json.loads(cli.stdout) == {"dropped": 2, "not_found": []}
    assert dead_ids(db, "*") == []


# --- tasks ------------------------------------------------------------------------


def _request(task_id: str, name: str, **kw: Any) -> Context:
    fields: dict[str, Any] = dict(
        id=task_id,
        task=name,
        args=[1, 2],
        kwargs={"k": "v"},
        hostname="w1@host",
        retries=0,
        delivery_info={"routing_key": "celery"},
        group=None,
        parent_id=None,
        root_id=task_id,
    )
    fields.update(kw)
    return Context(**fields)


@pytest.fixture
def celery_app(db_url: str) -> Iterator[Celery]:
    app = Celery("ops", broker=db_url, backend=db_url, set_as_current=False)
    app.conf.result_extended = True
    app.conf.broker_transport_options = kh.FAST
    yield app
    app.close()


def test_tasks(
    url: str, celery_app: Celery, conn: psycopg.Connection, db: psycopg.Connection
) -> None:
    backend = celery_app.backend
    backend.mark_as_done("ok-1", 3, request=_request("ok-1", "billing.add"))
    try:
        raise ValueError("bad input")
    except ValueError as exc:
        import traceback

        backend.mark_as_failure(
            "fail-1", exc, traceback.format_exc(), request=_request("fail-1", "billing.charge")
        )
    backend.store_result("run-1", {"pid": 1}, "STARTED", request=_request("run-1", "mail.send"))
    backend.mark_as_done("old-1", 0, request=_request("old-1", "billing.add"))
    db.execute(
        "UPDATE pgbroker.task_result SET updated_at = now() - interval '3 hours' "
        "WHERE task_id = 'old-1'"
    )
    # A task still queued, with a redelivery on record, and one dead-lettered.
    sent = celery_app.send_task("billing.refund", args=[5], task_id="queued-1")
    assert sent.id == "queued-1"
    db.execute(
        "INSERT INTO pgbroker.redelivery (reason, message_id, queue, task_id, consumer_id, "
        "delivery_count) VALUES ('consumer died', 1, 'celery', 'queued-1', 9, 1)"
    )
    celery_app.send_task("billing.void", task_id="dead-1")
    db.execute(
        "WITH m AS (DELETE FROM pgbroker.message WHERE task_id = 'dead-1' RETURNING *) "
        "INSERT INTO pgbroker.dead_letter (reason, queue, delivery_count, published_at, "
        "exchange, routing_key, task_id, task_name, priority, content_type, "
        "content_encoding, headers, properties, body) "
        "SELECT 'rejected', queue, 1, published_at, exchange, routing_key, task_id, "
        "task_name, priority, content_type, content_encoding, headers, properties, body FROM m"
    )

    page = admin.list_tasks(conn, "pgbroker")
    assert page.total == 4
    assert [t.task_id for t in page.items][-1] == "old-1"
    assert {t.task_id: t.state for t in page.items} == {
        "ok-1": "SUCCESS",
        "fail-1": "FAILURE",
        "run-1": "STARTED",
        "old-1": "SUCCESS",
    }
    ids = lambda page: sorted(t.task_id for t in page.items)  # noqa: E731
    assert ids(admin.list_tasks(conn, "pgbroker", state="failure")) == ["fail-1"]
    assert ids(admin.list_tasks(conn, "pgbroker", name="billing.*")) == ["fail-1", "ok-1", "old-1"]
    assert ids(admin.list_tasks(conn, "pgbroker", name="billing.add")) == ["ok-1", "old-1"]
    assert ids(admin.list_tasks(conn, "pgbroker", name="billing_add")) == []  # _ is literal
    assert ids(admin.list_tasks(conn, "pgbroker", since=timedelta(hours=1))) == [
        "fail-1",
        "ok-1",
        "run-1",
    ]
    limited = admin.list_tasks(conn, "pgbroker", limit=1)
    assert (len(limited.items), limited.total) == (1, 4)

    ok = admin.show_task(conn, "pgbroker", "ok-1")
    assert ok.result is not None
    assert (ok.result.state, ok.result.name, ok.result.result) == ("SUCCESS", "billing.add", 3)
    assert (ok.result.args, ok.result.kwargs, ok.result.worker) == ([1, 2], {"k": "v"}, "w1@host")
    assert ok.messages == [] and ok.dead_letters == [] and ok.redeliveries == []
    failed = admin.show_task(conn, "pgbroker", "fail-1")
    assert failed.result is not None
    assert failed.result.result["exc_type"] == "ValueError"
    assert "bad input" in (failed.result.traceback or "")
    queued = admin.show_task(conn, "pgbroker", "queued-1")
    assert queued.result is None
    assert [(m.queue, m.state, m.headers["task"]) for m in queued.messages] == [
        ("celery", "ready", "billing.refund")
    ]
    assert [(r.reason, r.consumer_id) for r in queued.redeliveries] == [("consumer died", 9)]
    dead = admin.show_task(conn, "pgbroker", "dead-1")
    assert [(d.reason, d.queue) for d in dead.dead_letters] == [("rejected", "celery")]
    with pytest.raises(NotFound, match="no task 'nope'"):
        admin.show_task(conn, "pgbroker", "nope")

    listed = run("tasks", "--state", "FAILURE", "--since", "1h", "--url", url)
    assert listed.returncode == 0, listed
    assert listed.stdout.splitlines()[0].split()[:3] == ["TASK", "ID", "NAME"]
    assert "fail-1" in listed.stdout and "billing.charge" in listed.stdout
    assert "ok-1" not in listed.stdout
    as_json = json.loads(run("tasks", "--json", "--limit", "2", "--url", url).stdout)
    assert (len(as_json["items"]), as_json["total"]) == (2, 4)

    shown = run("tasks", "show", "fail-1", "--url", url)
    assert shown.returncode == 0, shown
    assert "  state:     FAILURE" in shown.stdout
    assert "  args:      [1, 2]" in shown.stdout
    assert "  traceback:" in shown.stdout and "ValueError: bad input" in shown.stdout
    queued_text = run("tasks", "show", "queued-1", "--url", url).stdout
    assert "result:    none stored" in queued_text
    assert "messages (1):" in queued_text and "queue 'celery': ready" in queued_text
    assert "redeliveries (1):" in queued_text and "consumer died of consumer 9" in queued_text
    dead_json = json.loads(run("tasks", "show", "dead-1", "--json", "--url", url).stdout)
    assert dead_json["dead_letters"][0]["reason"] == "rejected"
    line = one_line_error(run("tasks", "show", "nope", "--url", url))
    assert "no task 'nope'" in line
    line = one_line_error(run("tasks", "--since", "soon", "--url", url))
    assert "--since: invalid duration 'soon'" in line


def test_pickled_results_are_not_unpickled(db_url: str, conn: psycopg.Connection) -> None:
    app = Celery("ops", broker="memory://", backend=db_url, set_as_current=False)
    app.conf.update(result_serializer="pickle", accept_content=["pickle", "json"])
    try:
        app.backend.mark_as_done("p-1", {"a": 1})
    finally:
        app.close()
    detail = admin.show_task(conn, "pgbroker", "p-1")
    assert detail.result is not None
    assert isinstance(detail.result.result, str)
    assert detail.result.result.endswith("bytes of application/x-python-serialize, not decoded>")


def test_tasks_need_the_result_table(db_url: str, db: psycopg.Connection) -> None:
    db.execute("DROP TABLE pgbroker.task_result CASCADE")
    with admin.open_connection(db_url, "pgbroker") as c:
        assert admin.status(c, "pgbroker").activity.results is None
        with pytest.raises(SchemaError, match="no task_result table"):
            admin.list_tasks(c, "pgbroker")
