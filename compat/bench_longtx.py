"""Throughput and pickup latency while a transaction pins the xmin horizon,
for :mod:`compat.bench` (pgbroker only).

Kombu consumers (``CONSUMERS`` unless told, each its own session, prefetch
as the other Kombu figures) consume one queue; one producer publishes to it at a
fixed ``rate``, in three phases one after the other:

* ``clean``: nothing else open;
* ``pinned``: a separate session holds a transaction open that pins the
  xmin horizon (``BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT
  txid_current();`` then idle), so VACUUM can remove no row deleted since;
* ``after``: the transaction has ended (the window is "the minute after").

Per phase: messages received per second over the phase's window (capped
by the rate: it falls below only when the consumers cannot keep up), the
p95 pickup latency (publish time, carried in the message, to the
consumer's receive time) of the phase's messages, the ready messages left
at the end (the backlog), the CPU of the database's server processes per
message, and a *drain rate*: at the end of the phase (for ``pinned``, while
the transaction is still open) the consumers pause, the producer publishes
``burst`` messages as fast as it can, the consumers resume, and the rate at
which they take everything that is ready is the consume capacity of that
moment. A fixed-rate producer alone would hide a slowdown of the claims
until it exceeds the spare capacity; the drain rate shows it directly.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from kombu import Connection, Producer

from compat import bench_pool
from compat.bench_celery import percentile

PHASES = ("clean", "pinned", "after")
CONSUMERS = 2


@dataclass
class Phase:
    name: str
    start: float = 0.0  # epoch seconds
    end: float = 0.0
    published: int = 0
    backlog: int = 0
    cpu_seconds: float | None = None
    resumed: float = 0.0  # epoch seconds: consumers resumed for the drain
    received: float = 0.0  # msg/s over the window
    p95_ms: float = 0.0
    p50_ms: float = 0.0
    drain: float = 0.0  # msg/s


def measure(
    url: str,
    options: dict[str, Any],
    admin: psycopg.Connection[Any],
    dbname: str,
    prefix: str,
    rate: float,
    seconds: dict[str, float],
    burst: int,
    prefetch: int,
    workdir: Path,
    consumers: int = CONSUMERS,
) -> tuple[dict[str, Phase], str]:
    """The phases' figures, and why the CPU could not be measured (or "")."""
    name = f"{prefix}.longtx"
    queue = bench_pool.declare(url, options, prefix, name)
    pool = bench_pool.ConsumerPool(url, options, prefix, [[name]] * consumers, prefetch, workdir)
    libpq = "postgresql://" + url.partition("://")[2]
    phases = {p: Phase(p) for p in PHASES}
    cpu_error = ""
    with pool, psycopg.connect(libpq, autocommit=True) as pinning:
        pool.start()
        with Connection(url, transport_options=options) as conn:
            producer = Producer(conn.channel(), exchange=queue.exchange, auto_declare=False)
            producer.publish({"warm": 1}, routing_key=name)
            total = 1
            pool.wait_consumed(total)
            for phase in phases.values():
                if phase.name == "pinned":
                    pinning.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
                    pinning.execute("SELECT txid_current()")
                cpu = bench_pool.DatabaseCpu(admin, dbname)
                try:
                    cpu.start()
                except bench_pool.CpuUnavailable as exc:
                    cpu_error, cpu = str(exc), None  # type: ignore[assignment]
                phase.start = time.time()
                phase.published = bench_pool.paced_publish(
                    producer, name, phase.name, rate, seconds[phase.name]
                )
                phase.end = time.time()
                if cpu is not None:
                    phase.cpu_seconds = cpu.seconds()
                total += phase.published
                phase.backlog = bench_pool.ready_count(url, options, queue)
                # The drain: a backlog built by the producer flat out, taken at once.
                pool.pause()
                time.sleep(0.2)  # receives in flight end
                bench_pool.flat_out_publish(producer, name, f"{phase.name}-burst", burst)
                total += burst
                phase.resumed = time.time()
                pool.resume()
                pool.wait_consumed(total, timeout=max(120.0, burst / 100))
                if phase.name == "pinned":
                    pinning.execute("ROLLBACK")
        records = pool.stop()
    with Connection(url, transport_options=options) as conn:
        queue(conn.channel()).delete()
    summarise(phases, records)
    return phases, cpu_error


def summarise(phases: dict[str, Phase], records: list[bench_pool.Record]) -> None:
    for phase in phases.values():
        window = phase.end - phase.start
        inside = sum(1 for r in records if phase.start <= r.received <= phase.end)
        phase.received = inside / window if window > 0 else 0.0
        pickups = [(r.received - r.published) * 1000 for r in records if r.kind == phase.name]
        if pickups:
            phase.p95_ms = percentile(pickups, 95)
            phase.p50_ms = statistics.median(pickups)
        burst = [r for r in records if r.kind == f"{phase.name}-burst"]
        if burst:
            last = max(r.received for r in burst)
            taken = sum(1 for r in records if phase.resumed <= r.received <= last)
            phase.drain = taken / (last - phase.resumed) if last > phase.resumed else 0.0
