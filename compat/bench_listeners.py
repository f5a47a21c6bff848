"""Server CPU per publish against the number of listening consumers, for
:mod:`compat.bench` (pgbroker only).

What a deployment with many workers looks like: ``listeners`` Kombu
consumers, each with its own connection (its own PostgreSQL session, which
LISTENs), all consuming the same queue, as many workers consuming the same
Celery queue do. One producer publishes ``messages`` messages to that queue
at a fixed ``rate`` (each publish is its own commit and its own NOTIFY, as
when a web application sends tasks one by one); the consumers take and ack
them. The figure is the CPU time of the PostgreSQL backends serving the
bench's database (producer, consumers, and anything pgbroker opens there)
from the first publish until every message is acked, divided by the
messages: it includes each publish, each claim and ack, and every wake-up a
NOTIFY causes in the listening sessions (on PostgreSQL 16 and older a
NOTIFY signals every backend listening in the database, and each woken
consumer may claim and find nothing). With one listener that is one
consumer doing all the work; a flat figure means listeners cost nothing per
publish.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
from kombu import Connection, Producer

from compat import bench_pool


def measure(
    url: str,
    options: dict[str, Any],
    admin: psycopg.Connection[Any],
    dbname: str,
    prefix: str,
    listeners: int,
    messages: int,
    rate: float,
    prefetch: int,
    workdir: Path,
    tag: str,
) -> tuple[float, int, float]:
    """(server CPU ms per publish, sessions closed in the window: not
    counted, the window in seconds: longer than ``messages / rate`` when
    the machine could not keep the rate or the consumers fell behind)."""
    name = f"{prefix}.listen{tag}"
    queue = bench_pool.declare(url, options, prefix, name)
    pool = bench_pool.ConsumerPool(url, options, prefix, [[name]] * listeners, prefetch, workdir)
    with pool:
        pool.start()
        time.sleep(0.5)  # let the sessions settle (first sweeps, start-up statements)
        cpu = bench_pool.DatabaseCpu(admin, dbname)
        with Connection(url, transport_options=options) as conn:
            producer = Producer(conn.channel(), exchange=queue.exchange, auto_declare=False)
            producer.publish({"warm": 1}, routing_key=name)  # the session is open
            pool.wait_consumed(1)
            cpu.start()
            started = time.monotonic()
            sent = bench_pool.paced_publish(producer, name, "l", rate, messages / rate)
            pool.wait_consumed(sent + 1)
            seconds = cpu.seconds()
            window = time.monotonic() - started
        pool.stop()
    with Connection(url, transport_options=options) as conn:
        queue(conn.channel()).delete()
    return seconds * 1000 / sent, cpu.gone, window
