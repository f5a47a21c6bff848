"""Routing from a per-session cache (docs/delivery.md, "Routing from a cache").

A publish whose cached route is still current is one plain insert (no join
of binding, exchange and queue, no regex); a route changed by another
process since is seen by the very next publish, because ``publish`` checks
the routing version in its own snapshot (015_routing_version.sql).
"""

from __future__ import annotations

import select
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from kombu import Connection, Exchange, Producer, Queue

from tests.kombu_helpers import role_granted_before

ROUTING_TABLES = {"binding", "exchange", "queue"}


def in_other_process(db_url: str, code: str) -> None:
    """Run Kombu ``code`` (``channel`` is a channel on ``db_url``) in
    another process, to its end: another session, another cache."""
    script = (
        "from kombu import Connection, Exchange, Queue\n"
        f"with Connection({db_url!r}) as conn:\n"
        "    channel = conn.channel()\n" + textwrap.indent(textwrap.dedent(code), "    ")
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def count_statements(conn: Connection, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every statement the transport's session sends, by name (named
    queries) or text (anything else, a LISTEN)."""
    counts: Counter[str] = Counter()
    transport = conn.transport
    session = transport.conn
    names = {text: name for name, text in transport._sql.items()}
    real = session.execute

    def execute(query: Any, *args: Any, **kwargs: Any) -> Any:
        counts[names.get(query, str(query))] += 1
        return real(query, *args, **kwargs)

    monkeypatch.setattr(session, "execute", execute)
    return counts


def scalar(db_url: str, query: str, *params: Any) -> Any:
    with psycopg.connect(db_url) as db:
        row = db.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def messages(db_url: str, queue: str) -> int:
    return int(scalar(db_url, "SELECT count(*) FROM pgbroker.message WHERE queue = %s", queue))


def dead_letters(db_url: str) -> int:
    return int(scalar(db_url, "SELECT count(*) FROM pgbroker.dead_letter"))


def version(db_url: str) -> int:
    return int(scalar(db_url, "SELECT version FROM pgbroker.routing_version"))


@pytest.fixture
def conn(db_url: str) -> Iterator[Connection]:
    with Connection(db_url) as c:
        c.connect()
        yield c


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


@pytest.mark.parametrize(
    ("exchange", "routing_key"),
    [("", "celery"), ("celery", "celery")],
    ids=["anonymous exchange", "default direct exchange"],
)
def test_a_plain_task_publish_is_one_insert_without_routing(
    conn: Connection, db_url: str, monkeypatch: pytest.MonkeyPatch, exchange: str, routing_key: str
) -> None:
    """Celery's default route (exchange '' or the direct exchange `celery`,
    routing key `celery`): one statement per publish, in which no routing
    table is named at all."""
    queue = Queue("celery", Exchange("celery", type="direct"), routing_key="celery")
    producer = Producer(conn.channel())
    queue(producer.channel).declare()
    producer.publish({"warm": True}, exchange=exchange, routing_key=routing_key)  # resolved
    counts = count_statements(conn, monkeypatch)
    sent: list[dict[str, Any]] = []
    transport = conn.transport
    real_run = transport.run

    def run(query: str, /, **params: Any) -> Any:
        sent.append(params)
        return real_run(query, **params)

    monkeypatch.setattr(transport, "run", run)
    for i in range(20):
        producer.publish({"i": i}, exchange=exchange, routing_key=routing_key)
    assert counts == Counter({"publish": 20})
    assert messages(db_url, "celery") == 21
    params = sent[-1]
    assert params["queues"] == ["celery"] and params["version"] == version(db_url)
    # The statement as sent, explained with ANALYZE: it reads the routing
    # version and inserts; no routing table is in its plan.
    with psycopg.connect(db_url, autocommit=True) as db:
        db.execute("BEGIN")
        text = transport.queries["publish"].as_bytes(db)
        row = db.execute(b"EXPLAIN (ANALYZE, FORMAT JSON) " + text, params).fetchone()
        db.execute("ROLLBACK")
    assert row is not None
    nodes = list(plan_nodes(row[0][0]["Plan"]))
    relations = {n["Relation Name"] for n in nodes if "Relation Name" in n}
    assert not relations & ROUTING_TABLES, relations
    assert "routing_version" in relations and "message" in relations
    assert not [n for n in nodes if "~" in str(n.get("Filter", ""))]


def test_a_stale_route_is_routed_in_sql_and_learned_again(
    conn: Connection, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Still one statement when the cache is stale: the statement routes in
    SQL and hands the new route back."""
    ex = Exchange("ex", type="direct")
    producer = Producer(conn.channel(), exchange=ex)
    Queue("q1", ex, routing_key="k")(producer.channel).declare()
    producer.publish({"n": 1}, routing_key="k")
    in_other_process(
        db_url, "Queue('q2', Exchange('ex', type='direct'), routing_key='k')(channel).declare()"
    )
    counts = count_statements(conn, monkeypatch)
    producer.publish({"n": 2}, routing_key="k")  # stale: nothing stored, routed in SQL
    producer.publish({"n": 3}, routing_key="k")  # the new route, from the cache
    assert counts == Counter({"publish": 2, "publish_routing": 1})
    assert (messages(db_url, "q1"), messages(db_url, "q2")) == (3, 2)
    route = conn.transport._routes.lookup("ex", "k")
    assert route is not None and route.queues == ("q1", "q2")
    assert route.version == version(db_url)


def test_bind_and_unbind_in_another_process_route_the_next_publish(
    conn: Connection, db_url: str
) -> None:
    ex = Exchange("ex", type="direct")
    producer = Producer(conn.channel(), exchange=ex)
    Queue("q1", ex, routing_key="k")(producer.channel).declare()
    producer.publish({"n": 1}, routing_key="k")  # cached: q1
    # Bound in A: B's next publish (persistent, one statement) goes there too.
    in_other_process(
        db_url, "Queue('q2', Exchange('ex', type='direct'), routing_key='k')(channel).declare()"
    )
    producer.publish({"n": 2}, routing_key="k")
    assert (messages(db_url, "q1"), messages(db_url, "q2")) == (2, 1)
    # Unbound in A: not routed there any more.
    in_other_process(db_url, "channel.queue_unbind('q1', 'ex', 'k')")
    producer.publish({"n": 3}, routing_key="k")
    assert (messages(db_url, "q1"), messages(db_url, "q2")) == (2, 2)
    # Queue deleted in A: no message stored for a queue that is gone; the
    # persistent message that routes nowhere is dead-lettered, as before.
    in_other_process(db_url, "channel.queue_delete('q2')")
    producer.publish({"n": 4}, routing_key="k")
    assert messages(db_url, "q2") == 0
    assert dead_letters(db_url) == 1


def test_a_queue_deleted_by_an_operator_is_not_routed_to(conn: Connection, db_url: str) -> None:
    """The version is bumped by triggers, so every writer counts: an
    operator's DELETE, as the sweep's removal of an expired queue or a cascade."""
    producer = Producer(conn.channel())
    Queue("q")(producer.channel).declare()
    producer.publish({"n": 1}, routing_key="q")  # cached: '' -> q
    with psycopg.connect(db_url, autocommit=True) as db:
        db.execute("DELETE FROM pgbroker.message")
        db.execute("DELETE FROM pgbroker.queue WHERE name = 'q'")
    producer.publish({"n": 2}, routing_key="q")
    assert messages(db_url, "q") == 0
    assert dead_letters(db_url) == 1


def test_an_exchange_deleted_and_declared_with_another_type(conn: Connection, db_url: str) -> None:
    direct = Exchange("ex", type="direct")
    producer = Producer(conn.channel(), exchange=direct)
    Queue("q1", direct, routing_key="a")(producer.channel).declare()
    producer.publish({"n": 1}, routing_key="a")  # q1
    producer.publish({"n": 2}, routing_key="b")  # nowhere: dead-lettered
    assert (messages(db_url, "q1"), dead_letters(db_url)) == (1, 1)
    in_other_process(
        db_url,
        """
        channel.exchange_delete('ex')
        Queue('q1', Exchange('ex', type='fanout'), routing_key='a')(channel).declare()
        """,
    )
    producer.publish({"n": 3}, routing_key="b", exchange="ex")  # fanout now
    assert (messages(db_url, "q1"), dead_letters(db_url)) == (2, 1)


def test_topic_patterns_across_processes(conn: Connection, db_url: str) -> None:
    topic = Exchange("t", type="topic")
    producer = Producer(conn.channel(), exchange=topic)
    Queue("q1", topic, routing_key="a.*")(producer.channel).declare()
    producer.publish({"n": 1}, routing_key="a.b")  # q1
    producer.publish({"n": 2}, routing_key="x.y")  # nowhere
    in_other_process(
        db_url, "Queue('q2', Exchange('t', type='topic'), routing_key='x.#')(channel).declare()"
    )
    producer.publish({"n": 3}, routing_key="x.y")  # q2 now
    producer.publish({"n": 4}, routing_key="a.b")  # still q1 only
    assert (messages(db_url, "q1"), messages(db_url, "q2")) == (2, 1)
    in_other_process(
        db_url,
        """
        channel.queue_unbind('q1', 't', 'a.*')
        channel.queue_bind('q2', 't', '#')
        """,
    )
    producer.publish({"n": 5}, routing_key="a.b")  # q2 by '#', not q1
    producer.publish({"n": 6}, routing_key="x.y")  # q2 once, though 'x.#' and '#' match
    assert (messages(db_url, "q1"), messages(db_url, "q2")) == (2, 3)


def test_redeclarations_do_not_change_the_routing_version(conn: Connection, db_url: str) -> None:
    """Celery declares its queues, exchanges and bindings again at every
    start and every new connection: that must not drop every cache."""
    ex = Exchange("ex", type="direct")
    queue = Queue("q", ex, routing_key="k", message_ttl=60)
    channel = conn.channel()
    queue(channel).declare()
    before = version(db_url)
    queue(channel).declare()
    channel.queue_bind("q", "ex", "k")
    in_other_process(
        db_url,
        "Queue('q', Exchange('ex', type='direct'), routing_key='k',\n"
        "      message_ttl=60)(channel).declare()",
    )
    assert version(db_url) == before
    channel.queue_bind("q", "ex", "other")
    assert version(db_url) == before + 1


def test_message_ttl_comes_from_the_cached_route(conn: Connection, db_url: str) -> None:
    producer = Producer(conn.channel())
    Queue("q", message_ttl=30)(producer.channel).declare()
    for i in range(3):
        producer.publish({"i": i}, routing_key="q")
    with psycopg.connect(db_url) as db:
        rows = db.execute(
            "SELECT extract(epoch FROM expires_at - published_at) FROM pgbroker.message"
        ).fetchall()
    ttls = [float(r[0]) for r in rows]
    assert len(ttls) == 3 and all(29 < t <= 30.5 for t in ttls), ttls


def wait_readable(conn: Connection, seconds: float = 5.0) -> None:
    """Until the session has something to read (a notification)."""
    select.select([conn.transport._conn.fileno()], [], [], seconds)


def test_transient_messages_that_route_nowhere_send_no_statement(
    conn: Connection, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ev = Exchange("ev", type="topic", delivery_mode="transient")
    producer = Producer(conn.channel(), exchange=ev)
    ev(producer.channel).declare()
    producer.publish({"n": 0}, routing_key="e.x")  # LISTEN, then routed in SQL
    producer.publish({"n": 1}, routing_key="e.x")  # learned: nowhere
    counts = count_statements(conn, monkeypatch)
    for i in range(10):
        producer.publish({"n": i}, routing_key="e.x")
    # The exchange has no binding at all: other keys go nowhere either
    # (Celery's task events, one key per event type).
    producer.publish({"n": "other"}, routing_key="task.sent")
    assert counts == Counter()
    # Bound in another process: its notification drops the cache, and the
    # next transient message is sent again.
    in_other_process(
        db_url, "Queue('evq', Exchange('ev', type='topic'), routing_key='e.#')(channel).declare()"
    )
    wait_readable(conn)
    producer.publish({"n": "after bind"}, routing_key="e.x")
    assert counts == Counter({"publish_routing": 1})
    assert messages(db_url, "evq") == 1
    # A persistent message never skips its statement: it is dead-lettered.
    producer.publish({"n": "learn"}, routing_key="z.z")  # routed in SQL: nowhere
    producer.publish({"n": "skip"}, routing_key="z.z")  # not sent
    assert counts == Counter({"publish_routing": 2})
    producer.publish({"n": "persistent"}, routing_key="z.z", delivery_mode=2)
    assert counts == Counter({"publish_routing": 3})
    assert dead_letters(db_url) == 1


def test_own_heartbeat_to_own_gossip_queue_is_not_sent(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where Celery's gossip is on, the worker heartbeat goes to its event
    exchange, where only this process's own gossip queue is bound: not sent
    (gossip ignores the worker's own events). Once another process binds a queue there (Flower,
    `celery events`), heartbeats are sent again."""
    ev = Exchange("celeryev", type="topic", delivery_mode="transient")
    with Connection(db_url) as consumer_conn, Connection(db_url) as events_conn:
        gossip = Queue("celeryev.gossip", ev, routing_key="worker.#", auto_delete=True)
        channel = consumer_conn.channel()
        gossip(channel).declare()
        channel.basic_consume("celeryev.gossip", False, lambda m: None, "tag")
        producer = Producer(events_conn.channel(), exchange=ev)
        headers = {"hostname": "w@h"}

        def heartbeat() -> None:
            producer.publish(
                {"type": "worker-heartbeat"}, routing_key="worker.heartbeat", headers=headers
            )

        heartbeat()  # LISTEN, routed in SQL
        heartbeat()  # learned: only our own queue
        counts = count_statements(events_conn, monkeypatch)
        for _ in range(5):
            heartbeat()
        assert counts == Counter()
        # Another event type (worker-online...) is sent.
        producer.publish({"type": "worker-online"}, routing_key="worker.online", headers=headers)
        assert counts == Counter({"publish_routing": 1})
        in_other_process(
            db_url,
            "Queue('celeryev.flower', Exchange('celeryev', type='topic'),\n"
            "      routing_key='#')(channel).declare()",
        )
        wait_readable(events_conn)
        heartbeat()  # the cache was dropped: routed in SQL
        heartbeat()  # the cached route, to both queues
        assert counts == Counter({"publish_routing": 2, "publish": 1})
        assert messages(db_url, "celeryev.flower") == 2


def test_a_deduplicated_publish_on_a_stale_route_is_stored_once(
    conn: Connection, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stale `publish` records no published_task row: the message that
    `publish_routing` then stores is not taken for its own duplicate; and
    the same publication again is still recognised."""
    from tests.test_dedup import running, task_headers

    producer = Producer(conn.channel())
    Queue("q1")(producer.channel).declare()
    producer.publish({"warm": True}, routing_key="q1")  # cached: '' -> q1
    in_other_process(db_url, "Queue('unrelated')(channel).declare()")  # a new version
    counts = count_statements(conn, monkeypatch)
    with running(conn, 101):
        producer.publish("x", routing_key="q1", headers=task_headers("t-stale"))
        assert counts == Counter({"publish": 1, "publish_routing": 1})
        producer.publish("x", routing_key="q1", headers=task_headers("t-stale"))  # duplicate
    assert counts == Counter({"publish": 2, "publish_routing": 1})
    assert scalar(db_url, "SELECT count(*) FROM pgbroker.message WHERE task_id = 't-stale'") == 1
    assert scalar(db_url, "SELECT count(*) FROM pgbroker.published_task") == 1


def test_a_role_granted_before_the_routing_version_still_publishes_and_declares(
    db_url: str,
) -> None:
    """An application role granted the tables before migration 015 (the
    grant does not cover tables created later) reads the routing version
    and bumps it through the trigger, which runs as its owner."""
    with role_granted_before(db_url, "pgb_old_grant_", "routing_version") as role:
        before = version(db_url)
        with psycopg.connect(db_url, autocommit=True) as app:
            app.execute(f'SET ROLE "{role}"')
            app.execute("INSERT INTO pgbroker.queue (name) VALUES ('granted')")
            assert app.execute("SELECT version FROM pgbroker.routing_version").fetchone() == (
                before + 1,
            )
