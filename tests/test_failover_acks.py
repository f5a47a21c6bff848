"""Acks of a lost session across an asynchronous failover.

A consumer's acks that its session lost before writing them are written
by the process's next session (``ack_orphaned`` in pgbroker/sql/queries.sql).
After an asynchronous standby is promoted, the old primary's last commits
are gone, and among them may be the work an ack acknowledges: written on
the new primary, the ack would remove the message of work that no longer
exists, and the task would be lost. The acks are written only on the
timeline the message was claimed on (018_server_timeline); on another one
the message is delivered again.

The asynchronous case of tests/test_ha_failover.py lost a chain this way,
once, under load: its first link's effects gone with the old primary, and
its message removed by the worker's ack, written on the new primary.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import psycopg
import pytest
from kombu import Connection, Producer, Queue

from pgbroker.database import schema
from pgbroker.database.sessions import connect
from tests.celery_helpers import execute, wait_until
from tests.kombu_helpers import FAST
from tests.test_ha_failover import binaries, primary_and_standby, replication_state

pytestmark = pytest.mark.slow

QUEUE = Queue("failover_acks", routing_key="failover_acks")


def timeline(url: str) -> int:
    return int(execute(url, "SELECT pgbroker.server_timeline()")[0][0])


def test_an_ack_lost_with_its_session_is_not_written_on_another_timeline(
    pg_admin_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with primary_and_standby(binaries(pg_admin_url), synchronous=False) as (primary, standby):
        wait_until(lambda: replication_state(primary) == "async", 30, "the standby to stream")
        url = (
            f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}"
            "/postgres?target_session_attrs=read-write"
        )
        with connect(url) as conn:
            schema.migrate(conn, "pgbroker")
            conn.execute("CREATE TABLE work (n int)")
        first_timeline = timeline(primary.url())

        with Connection(url, transport_options=FAST) as first:
            channel = first.channel()
            QUEUE(channel).declare()
            Producer(channel).publish({"n": 1}, routing_key=QUEUE.routing_key)
            delivered = QUEUE(channel).get()
            assert delivered is not None and delivered.payload == {"n": 1}

            # The standby has the claim; then it falls behind (its WAL
            # receiver stopped) and misses the work done for the message.
            lsn = execute(primary.url(), "SELECT pg_current_wal_lsn()::text")[0][0]
            wait_until(
                lambda: execute(
                    standby.url(), "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)
                )[0][0],
                30,
                "the standby to replay the claim",
            )
            (receiver,) = execute(standby.url(), "SELECT pid FROM pg_stat_wal_receiver")[0]
            os.kill(receiver, signal.SIGSTOP)
            execute(primary.url(), "INSERT INTO work VALUES (1)")
            time.sleep(0.2)
            primary.kill()
            os.kill(receiver, signal.SIGKILL)  # what it had not read goes with it
            standby.promote()

            # The work is done: the application acks. The session is gone,
            # so the ack waits for the process's next session.
            with pytest.raises(first.connection_errors):
                delivered.ack()

        new_primary = standby.url()
        assert execute(new_primary, "SELECT count(*) FROM work")[0][0] == 0, "the work is lost"
        assert timeline(new_primary) != first_timeline

        caplog.set_level(logging.WARNING, logger="pgbroker.broker")
        with Connection(url, transport_options=FAST) as second:
            # Its first claim would write the lost session's ack: on another
            # timeline it does not, and the sweep hands the message back.
            found: list[object] = []

            def delivered_again() -> bool:
                message = QUEUE(second.channel()).get()
                if message is not None:
                    found.append(message)
                return bool(found)

            wait_until(delivered_again, 30, "the message to be delivered again")
            again = found[0]
            assert again.payload == {"n": 1}  # type: ignore[attr-defined]
            again.ack()  # type: ignore[attr-defined]
        assert "not written: the server is on another timeline" in caplog.text
        with psycopg.connect(new_primary) as db:
            assert db.execute("SELECT count(*) FROM pgbroker.message").fetchone() == (0,)
