"""Consumer scaling, for :mod:`compat.bench`: does throughput hold as consumers are added?

For each consumer count (1, 8, 32, 64 at full size) and each layout (all on
one queue; spread over 16 queues), ``messages`` messages are put in the
queue(s) first, then that many Kombu consumers, each with its own
connection (for pgbroker: its own PostgreSQL session), consume and ack
them. The consumers are threads spread over up to four child processes (2
cores: more processes would only measure start-up and the scheduler). Every
consumer connects, consumes an empty warm-up queue once (its once-per-session
start-up) and says "ready" before the clock starts; the clock starts
when the bench creates the "go" file, and stops at the last ack of any
consumer. The figure is messages per second over all consumers.

pgbroker's queues are filled by SQL copies of one published message
(:func:`compat.bench_backlog.fill`), the other systems' by Kombu publishes:
the fill is not timed.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from kombu import Connection, Consumer, Exchange, Producer, Queue

ROOT = Path(__file__).resolve().parents[1]
SPREAD_QUEUES = 16
MAX_PROCESSES = 4
#: A consumer stops after this long with nothing to do (not counted: the
#: figure ends at the last ack).
IDLE_STOP = 1.5


#: Connections left free for other clients of a shared server.
CONNECTION_HEADROOM = 10


def free_connections(url: str) -> int:
    """Sessions the server still accepts (max_connections less the reserved
    ones less the client sessions connected now)."""
    with psycopg.connect("postgresql://" + url.partition("://")[2], autocommit=True) as conn:
        row = conn.execute(
            "SELECT current_setting('max_connections')::int"
            " - current_setting('superuser_reserved_connections')::int"
            " - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
        ).fetchone()
        return int(row[0]) if row else 0


def queue_names(prefix: str, layout: str) -> list[str]:
    if layout == "one":
        return [f"{prefix}.scale1"]
    return [f"{prefix}.scale16.{i}" for i in range(SPREAD_QUEUES)]


def warm_queue_name(prefix: str) -> str:
    """The empty queue each consumer consumes once before the clock starts."""
    return f"{prefix}.scalewarm"


def assignment(consumers: int, queues: list[str]) -> list[list[str]]:
    """Queues per consumer: every queue is consumed, as evenly as possible."""
    if consumers >= len(queues):
        return [[queues[i % len(queues)]] for i in range(consumers)]
    return [[q for j, q in enumerate(queues) if j % consumers == i] for i in range(consumers)]


def declare(url: str, options: dict[str, Any], prefix: str, names: list[str]) -> None:
    exchange = Exchange(prefix, type="direct", durable=True)
    with Connection(url, transport_options=options) as conn:
        channel = conn.channel()
        for name in names:
            Queue(name, exchange, routing_key=name, durable=True)(channel).declare()


def publish(
    url: str, options: dict[str, Any], prefix: str, names: list[str], n: int, body: Any
) -> None:
    exchange = Exchange(prefix, type="direct", durable=True)
    with Connection(url, transport_options=options) as conn:
        producer = Producer(conn.channel(), exchange=exchange, auto_declare=False)
        for i in range(n):
            name = names[i % len(names)]
            producer.publish(body, routing_key=name, delivery_mode=2, serializer="json")


def run_consumers(
    url: str,
    options: dict[str, Any],
    prefix: str,
    per_consumer: list[list[str]],
    expected: int,
    prefetch: int,
    workdir: Path,
    timeout: float = 300.0,
    idle_stop: float = IDLE_STOP,
) -> float:
    """Start the consumers, time them draining ``expected`` messages; msg/s."""
    processes = min(MAX_PROCESSES, len(per_consumer))
    go = workdir / f"go-{os.getpid()}-{time.monotonic_ns()}"
    children = []
    try:
        for p in range(processes):
            mine = per_consumer[p::processes]
            out = workdir / f"scale-{go.name}-{p}.log"
            env = {
                **os.environ,
                "BENCH_URL": url,
                "BENCH_OPTIONS": json.dumps(options),
                "BENCH_PREFIX": prefix,
                "BENCH_ASSIGN": json.dumps(mine),
                "BENCH_PREFETCH": str(prefetch),
                "BENCH_GO": str(go),
                "BENCH_IDLE_STOP": str(idle_stop),
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            }
            with out.open("wb") as f:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "compat.bench_scale", "_child"],
                    cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            children.append((proc, out))
        deadline = time.monotonic() + timeout
        for proc, out in children:
            _wait_line(proc, out, "ready", deadline)
        go.touch()
        started = time.monotonic()
        total, last = 0, started
        for proc, out in children:
            line = _wait_line(proc, out, "done", deadline)
            _, count, last_ack = line.split()
            total += int(count)
            last = max(last, float(last_ack))
        if total != expected:
            raise RuntimeError(f"scale: {total} consumed of {expected}")
        return total / (last - started)
    finally:
        for proc, _ in children:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
            proc.wait(10)


def _wait_line(proc: subprocess.Popen[bytes], out: Path, word: str, deadline: float) -> str:
    while True:
        for line in out.read_text(errors="replace").splitlines():
            if line.startswith(word):
                return line
        if proc.poll() is not None or time.monotonic() > deadline:
            text = out.read_text(errors="replace").strip().splitlines()
            raise RuntimeError(f"scale consumer process failed: {' | '.join(text[-3:])[:300]}")
        time.sleep(0.02)


def child_main() -> None:
    url = os.environ["BENCH_URL"]
    options = json.loads(os.environ["BENCH_OPTIONS"])
    prefix = os.environ["BENCH_PREFIX"]
    assign: list[list[str]] = json.loads(os.environ["BENCH_ASSIGN"])
    prefetch = int(os.environ["BENCH_PREFETCH"])
    go = Path(os.environ["BENCH_GO"])
    idle_stop = float(os.environ.get("BENCH_IDLE_STOP", IDLE_STOP))
    exchange = Exchange(prefix, type="direct", durable=True)
    if url.startswith(("postgresql", "postgres", "pgbroker")):
        # The parent checks for all consumers; each process checks again for
        # its own, in case other clients connected in between.
        free = free_connections(url)
        if free < len(assign) + CONNECTION_HEADROOM:
            raise SystemExit(
                f"not enough free connections for {len(assign)} consumers: {free} free, "
                f"{CONNECTION_HEADROOM} kept for other clients"
            )
    conns = [Connection(url, transport_options=options) for _ in assign]
    warm_name = warm_queue_name(prefix)
    warm = Queue(warm_name, exchange, routing_key=warm_name)
    for conn in conns:
        conn.connect()
        # Consume the empty warm-up queue once: what a consumer does once
        # per session (pgbroker: register, LISTEN, a first claim planned in
        # a new backend) happens before the clock, as the connection does.
        with (
            Consumer(conn.default_channel, [warm], auto_declare=False),
            contextlib.suppress(TimeoutError, OSError),
        ):
            conn.drain_events(timeout=0.01)
    print("ready", flush=True)
    end = time.monotonic() + 600  # bounded even if the parent dies
    while not go.exists():
        if time.monotonic() > end:
            raise SystemExit("no go")
        time.sleep(0.002)
    counts = [0] * len(assign)
    lasts = [0.0] * len(assign)

    def consume(i: int) -> None:
        conn = conns[i]

        def on_message(body: Any, message: Any) -> None:
            message.ack()
            counts[i] += 1
            lasts[i] = time.monotonic()

        queues = [Queue(n, exchange, routing_key=n, durable=True) for n in assign[i]]
        consumer = Consumer(
            conn.default_channel, queues, callbacks=[on_message], prefetch_count=prefetch,
            auto_declare=False,
        )  # fmt: skip
        idle_since = time.monotonic()
        with consumer:
            while time.monotonic() < end:
                before = counts[i]
                with contextlib.suppress(TimeoutError, OSError):
                    conn.drain_events(timeout=0.25)
                now = time.monotonic()
                if counts[i] != before:
                    idle_since = now
                elif now - idle_since > idle_stop:
                    break

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(assign))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for conn in conns:
        with contextlib.suppress(Exception):
            conn.release()
    print(f"done {sum(counts)} {max(lasts) if any(counts) else 0.0}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_child"]:
        child_main()
