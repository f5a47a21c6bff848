"""Kombu failover URLs (``"postgresql://dead;postgresql://live"``).

Kombu's own failover tests (t/integration/common.py, ``BaseFailover`` of
kombu 5.7.0), ported to pgbroker URLs: the connection starts on the first
URL, a dead first URL fails over to the live one and messages flow, dotted
alternates are refused, and the password never shows.

pgbroker parses its own URLs (``can_parse_url``, so that libpq's multi-host
syntax and ``?sslmode=require`` survive); Kombu would then leave
``conn.port`` unset, and pgbroker fills it in from a one-host URL
(pgbroker/urltypo.py) so that the connection reports the port it starts on,
as Redis and AMQP connections do. After a switch Kombu parses the
alternate, as for every transport, and ``conn.port`` is the live URL's port.
"""

from __future__ import annotations

import socket
import sys
from contextlib import closing
from urllib.parse import urlparse

import kombu
import pytest

from pgbroker.errors import ConfigurationError

#: Scheme of an alternate URL that must never be resolved as a transport
#: (kombu's BAIT_TRANSPORT, Issue #2641).
BAIT_TRANSPORT = "tbait2641.evil"

#: Kombu's own refusal of a dotted URL scheme (Issue #2641) came in 5.7:
#: 5.5 and 5.6 import the module it names, whatever the first URL.
refuses_dotted = pytest.mark.skipif(
    kombu.VERSION[:2] < (5, 7), reason="Kombu < 5.7 imports a dotted URL scheme (Issue #2641)"
)


def dead_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def live_url(db_url: str) -> str:
    # A password, to see it masked (trust authentication ignores it).
    parts = urlparse(db_url)
    assert parts.password is None
    return db_url.replace(f"{parts.username}@", f"{parts.username}:s3cret@", 1)


@pytest.fixture
def failover_connection(live_url: str) -> kombu.Connection:
    dead = urlparse(live_url)._replace(netloc=f"postgres:s3cret@127.0.0.1:{dead_port()}")
    return kombu.Connection(f"{dead.geturl()};{live_url}")


def test_connect(failover_connection: kombu.Connection) -> None:
    connection = failover_connection
    assert connection.connect()
    assert connection.connection
    connection.close()
    assert connection.connection is None
    assert connection.connect()
    assert connection.connection
    connection.close()


def test_publish_consume(failover_connection: kombu.Connection) -> None:
    test_queue = kombu.Queue("test", routing_key="test")
    received = []

    def callback(body: object, message: kombu.Message) -> None:
        assert body == {"hello": "world"}
        assert message.content_type == "application/x-python-serialize"
        message.ack()
        assert message.payload == body
        received.append(body)

    with failover_connection as conn, conn.channel() as channel:
        producer = kombu.Producer(channel)
        producer.publish(
            {"hello": "world"},
            retry=True,
            exchange=test_queue.exchange,
            routing_key=test_queue.routing_key,
            declare=[test_queue],
            serializer="pickle",
        )
        consumer = kombu.Consumer(conn, [test_queue], accept=["pickle"])
        consumer.register_callback(callback)
        with consumer:
            conn.drain_events(timeout=1)
    assert received == [{"hello": "world"}]


def test_consume_empty_queue(failover_connection: kombu.Connection) -> None:
    def callback(body: object, message: kombu.Message) -> None:
        raise AssertionError("Callback should not be called")

    test_queue = kombu.Queue("test_empty", routing_key="test_empty")
    with failover_connection as conn, conn.channel():
        consumer = kombu.Consumer(conn, [test_queue], accept=["pickle"])
        consumer.register_callback(callback)
        with consumer, pytest.raises(socket.timeout):
            conn.drain_events(timeout=1)


def test_simple_buffer_publish_consume(failover_connection: kombu.Connection) -> None:
    with failover_connection as conn, closing(conn.SimpleBuffer("simple_buffer_test")) as buf:
        buf.put({"Hello": "World"}, headers={"k1": "v1"})
        message = buf.get(timeout=1)
        assert message.payload == {"Hello": "World"}
        assert message.content_type == "application/json"
        assert message.content_encoding == "utf-8"
        assert message.headers == {"k1": "v1"}
        message.ack()


def test_failover_switches_to_alternate_url(
    failover_connection: kombu.Connection, live_url: str
) -> None:
    conn = failover_connection
    assert len(conn.alt) > 1, "fixture must supply an alternate URL"
    dead, live = urlparse(conn.alt[0]), urlparse(conn.alt[-1])
    assert dead.port != live.port, "first URL must be the dead one"
    assert conn.port == dead.port
    assert urlparse(conn.as_uri()).port == dead.port

    assert conn.connect()
    assert conn.connected
    # failover happened: the dead URL was abandoned for the alternate
    assert conn.port == live.port
    assert conn.transport_cls == live.scheme
    # ...on the alternate's server, database and role, password masked
    assert conn.as_uri() == live_url.replace(":s3cret@", ":**@")
    assert "s3cret" not in repr(conn.info().get("hostname"))
    row = conn.transport.run("size", queue="none")  # a query on the live session
    assert row == (0,)
    session = conn.transport.conn.info
    assert (session.port, session.dbname, session.user) == (
        live.port,
        live.path.lstrip("/"),
        live.username,
    )
    conn.close()


@refuses_dotted
def test_failover_rejects_dotted_alternate(failover_connection: kombu.Connection) -> None:
    live_url = failover_connection.alt[-1]
    alternates = [
        f"{BAIT_TRANSPORT}://localhost",
        f"{BAIT_TRANSPORT}+amqp://localhost",
    ]
    for alternate in alternates:
        with pytest.raises(ValueError, match="Invalid transport scheme"):
            kombu.Connection(f"{live_url};{alternate}")
        with pytest.raises(ValueError, match="Invalid transport scheme"):
            kombu.Connection([live_url, alternate])
        with pytest.raises(ValueError, match="Invalid transport scheme"):
            kombu.Connection(live_url, alternates=[alternate])
    assert BAIT_TRANSPORT.split(".")[0] not in sys.modules


@refuses_dotted
def test_failover_to_dotted_alternate_keeps_transport(
    failover_connection: kombu.Connection,
) -> None:
    conn = failover_connection
    assert conn.connect()
    live = (conn.transport_cls, conn.hostname, conn.port)

    with pytest.raises(ValueError, match="Invalid transport scheme"):
        conn.switch(f"{BAIT_TRANSPORT}://localhost")

    assert (conn.transport_cls, conn.hostname, conn.port) == live
    assert BAIT_TRANSPORT.split(".")[0] not in sys.modules
    assert conn.connect()
    assert conn.connected
    conn.close()


def test_failover_to_alias_alternate_is_allowed(failover_connection: kombu.Connection) -> None:
    conn = failover_connection
    live_url = conn.alt[-1]
    live = urlparse(live_url)

    conn.switch(live_url)

    assert conn.transport_cls == live.scheme
    assert conn.port == live.port
    assert conn.connect()
    assert conn.connected
    conn.close()


def test_failover_messages_flow_from_a_producer_to_a_consumer(
    failover_connection: kombu.Connection, live_url: str
) -> None:
    """Published through the failover connection, consumed on the live URL."""
    with failover_connection as conn:
        queue = conn.SimpleQueue("failover_flow")
        for i in range(3):
            queue.put({"i": i})
        queue.close()
    with kombu.Connection(live_url) as direct:
        queue = direct.SimpleQueue("failover_flow")
        got = []
        for _ in range(3):
            message = queue.get(timeout=2)
            got.append(message.payload["i"])
            message.ack()
        queue.close()
    assert got == [0, 1, 2]


def test_libpq_parameters_in_failover_urls_are_refused_clearly(live_url: str) -> None:
    """Kombu's switch() parses an alternate into fixed fields and fails on any
    other query parameter: say so before the first connection."""
    conn = kombu.Connection(f"{live_url}?sslmode=disable;{live_url}")
    with pytest.raises(ConfigurationError, match="PGSSLMODE") as caught:
        conn.connect()
    assert "s3cret" not in str(caught.value)
    conn.close()


def test_a_single_url_keeps_its_libpq_parameters(live_url: str) -> None:
    with kombu.Connection(f"{live_url}?application_name=failover-test") as conn:
        conn.connect()
        name = conn.transport.conn.execute("SHOW application_name").fetchone()
        assert name == ("failover-test",)


def test_port_is_left_to_libpq_for_several_hosts() -> None:
    """libpq's multi-host URL names a port per host: none is the port."""
    conn = kombu.Connection("postgresql://app@db1,db2:5433/jobs?target_session_attrs=read-write")
    assert conn.port is None
    assert conn.hostname == "postgresql://app@db1,db2:5433/jobs?target_session_attrs=read-write"
    assert kombu.Connection("postgresql://app@db1:5433/jobs").port == 5433
    assert kombu.Connection("postgresql://app@db1/jobs").port is None
