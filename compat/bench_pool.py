"""Long-lived Kombu consumers and a paced producer, for :mod:`compat.bench`'s
``listeners`` and ``longtx`` parts.

:class:`ConsumerPool` starts consumers (each with its own connection, for
pgbroker its own PostgreSQL session) as threads spread over up to four child
processes, as :mod:`compat.bench_scale` does, but they stay until told to
stop, can be paused (they stop calling ``drain_events``: a backlog builds up
while a producer runs flat out), and record every message they receive:
receive time, the publish time the message carries, and its kind. Wall-clock
times (``time.time()``) are compared across processes of one machine.

:class:`DatabaseCpu` measures the CPU time of the PostgreSQL backends serving
one database (``pg_stat_activity`` gives their pids, ``/proc`` their
utime+stime): on a server shared with other clients, only the bench's own
sessions count.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from kombu import Connection, Consumer, Exchange, Producer, Queue

from compat import bench_scale

ROOT = Path(__file__).resolve().parents[1]
PROC = Path("/proc")
MAX_PROCESSES = 4
#: How often a child writes its running count.
PROGRESS_INTERVAL = 0.05


class CpuUnavailable(Exception):
    pass


@dataclass(frozen=True)
class Record:
    received: float  # epoch seconds, in the consumer
    published: float  # epoch seconds, from the message body
    kind: str  # what the producer put in the body ("k")


def message_body(kind: str, pad: int = 150) -> dict[str, Any]:
    """A message that carries its publish time (taken now) and kind."""
    return {"t": time.time(), "k": kind, "pad": "x" * pad}


@dataclass
class ConsumerPool:
    url: str
    options: dict[str, Any]
    prefix: str
    #: Queues per consumer.
    assign: list[list[str]]
    prefetch: int
    workdir: Path
    #: Connections left free for other clients of a shared server.
    headroom: int = bench_scale.CONNECTION_HEADROOM
    children: list[tuple[subprocess.Popen[bytes], Path, Path]] = field(default_factory=list)
    tag: str = field(default_factory=lambda: f"{os.getpid()}-{time.monotonic_ns()}")

    @property
    def stop_file(self) -> Path:
        return self.workdir / f"pool-{self.tag}.stop"

    @property
    def pause_file(self) -> Path:
        return self.workdir / f"pool-{self.tag}.pause"

    def start(self, timeout: float = 120.0) -> None:
        processes = min(MAX_PROCESSES, len(self.assign))
        for p in range(processes):
            out = self.workdir / f"pool-{self.tag}-{p}.log"
            records = self.workdir / f"pool-{self.tag}-{p}.records"
            env = {
                **os.environ,
                "BENCH_URL": self.url,
                "BENCH_OPTIONS": json.dumps(self.options),
                "BENCH_PREFIX": self.prefix,
                "BENCH_ASSIGN": json.dumps(self.assign[p::processes]),
                "BENCH_PREFETCH": str(self.prefetch),
                "BENCH_STOP": str(self.stop_file),
                "BENCH_PAUSE": str(self.pause_file),
                "BENCH_RECORDS": str(records),
                "BENCH_HEADROOM": str(self.headroom),
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            }
            with out.open("wb") as f:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "compat.bench_pool", "_child"],
                    cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            self.children.append((proc, out, records))
        deadline = time.monotonic() + timeout
        for proc, out, _ in self.children:
            bench_scale._wait_line(proc, out, "ready", deadline)

    def consumed(self) -> int:
        """Messages received so far, over all consumers (as last reported)."""
        total = 0
        for proc, out, _ in self.children:
            last = 0
            for line in out.read_text(errors="replace").splitlines():
                if line.startswith("count "):
                    last = int(line.split()[1])
            if proc.poll() is not None and proc.returncode:
                raise RuntimeError(f"consumer process failed: {tail(out)}")
            total += last
        return total

    def wait_consumed(self, total: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while (got := self.consumed()) < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"consumers received {got} of {total} in {timeout:.0f} s")
            time.sleep(PROGRESS_INTERVAL / 2)

    def pause(self) -> None:
        self.pause_file.touch()

    def resume(self) -> None:
        self.pause_file.unlink(missing_ok=True)

    def stop(self, timeout: float = 60.0) -> list[Record]:
        """Stop every consumer; every message they received."""
        self.stop_file.touch()
        deadline = time.monotonic() + timeout
        records: list[Record] = []
        try:
            for proc, out, path in self.children:
                bench_scale._wait_line(proc, out, "done", deadline)
                for line in path.read_text().splitlines():
                    received, published, kind = line.split()
                    records.append(Record(float(received), float(published), kind))
        finally:
            self.kill()
        return records

    def kill(self) -> None:
        for proc, _, _ in self.children:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
            proc.wait(10)
        self.children.clear()

    def __enter__(self) -> ConsumerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def tail(out: Path) -> str:
    lines = out.read_text(errors="replace").strip().splitlines()
    return " | ".join(lines[-3:])[:300]


def child_main() -> None:
    url = os.environ["BENCH_URL"]
    options = json.loads(os.environ["BENCH_OPTIONS"])
    exchange = Exchange(os.environ["BENCH_PREFIX"], type="direct", durable=True)
    assign: list[list[str]] = json.loads(os.environ["BENCH_ASSIGN"])
    prefetch = int(os.environ["BENCH_PREFETCH"])
    stop, pause = Path(os.environ["BENCH_STOP"]), Path(os.environ["BENCH_PAUSE"])
    headroom = int(os.environ["BENCH_HEADROOM"])
    if url.startswith(("postgresql", "postgres", "pgbroker")):
        free = bench_scale.free_connections(url)
        if free < len(assign) + headroom:
            raise SystemExit(
                f"not enough free connections for {len(assign)} consumers: {free} free, "
                f"{headroom} kept for other clients"
            )
    end = time.monotonic() + 3600  # bounded even if the parent dies
    records: list[tuple[float, float, str]] = []
    lock = threading.Lock()
    ready = threading.Semaphore(0)
    errors: list[str] = []

    def consume(queues: list[str]) -> None:
        try:
            with Connection(url, transport_options=options) as conn:

                def on_message(body: Any, message: Any) -> None:
                    received = time.time()
                    message.ack()
                    with lock:
                        records.append((received, float(body.get("t", 0)), body.get("k", "?")))

                bound = [Queue(n, exchange, routing_key=n, durable=True) for n in queues]
                consumer = Consumer(
                    conn.default_channel, bound, callbacks=[on_message],
                    prefetch_count=prefetch, auto_declare=False,
                )  # fmt: skip
                with consumer:
                    # One drain first: the consumer is listening when "ready" is said.
                    with contextlib.suppress(TimeoutError):
                        conn.drain_events(timeout=0.05)
                    ready.release()
                    while not stop.exists() and time.monotonic() < end:
                        if pause.exists():
                            time.sleep(0.005)
                            continue
                        with contextlib.suppress(TimeoutError):
                            conn.drain_events(timeout=0.1)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}".splitlines()[0])
            ready.release()

    threads = [threading.Thread(target=consume, args=(q,), daemon=True) for q in assign]
    for t in threads:
        t.start()
    for _ in threads:
        ready.acquire()
    if errors:
        raise SystemExit(f"consumer failed: {errors[0]}")
    print("ready", flush=True)
    while any(t.is_alive() for t in threads):
        with lock:
            count = len(records)
        print(f"count {count}", flush=True)
        if errors:
            raise SystemExit(f"consumer failed: {errors[0]}")
        time.sleep(PROGRESS_INTERVAL)
    Path(os.environ["BENCH_RECORDS"]).write_text(
        "".join(f"{r:.6f} {p:.6f} {k}\n" for r, p, k in records)
    )
    print(f"count {len(records)}", flush=True)
    print(f"done {len(records)}", flush=True)


def paced_publish(
    producer: Producer, routing_key: str, kind: str, rate: float, seconds: float
) -> int:
    """Publish at ``rate`` messages per second for ``seconds``; messages sent."""
    return paced(
        lambda _: producer.publish(
            message_body(kind), routing_key=routing_key, delivery_mode=2, serializer="json"
        ),
        rate,
        seconds,
    )


def paced(send: Callable[[int], Any], rate: float, seconds: float) -> int:
    """Call ``send(i)`` at ``rate`` per second for ``seconds`` (each call at
    its slot; late ones at once, not skipped); calls made."""
    interval = 1.0 / rate
    start = time.monotonic()
    n = max(1, round(rate * seconds))
    for i in range(n):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        send(i)
    return n


def flat_out_publish(producer: Producer, routing_key: str, kind: str, n: int) -> None:
    for _ in range(n):
        producer.publish(message_body(kind), routing_key=routing_key, delivery_mode=2,
                         serializer="json")  # fmt: skip


def declare(url: str, options: dict[str, Any], prefix: str, name: str) -> Queue:
    exchange = Exchange(prefix, type="direct", durable=True)
    queue = Queue(name, exchange, routing_key=name, durable=True)
    with Connection(url, transport_options=options) as conn:
        queue(conn.channel()).declare()
    return queue


def ready_count(url: str, options: dict[str, Any], queue: Queue) -> int:
    """Ready messages in ``queue``, as the transport reports them."""
    with Connection(url, transport_options=options) as conn:
        return int(queue(conn.channel()).queue_declare().message_count)


# --- CPU of one database's backends --------------------------------------------


def backend_cpu(pid: int) -> float | None:
    """CPU seconds of one single-threaded process (a PostgreSQL backend);
    None when it is gone. From ``schedstat`` (nanoseconds) where the kernel
    keeps it: utime+stime come in 10 ms ticks, and a backend serving a few
    dozen tasks can use less than one, so short windows read 0."""
    try:
        nanoseconds = int((PROC / str(pid) / "schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        nanoseconds = 0
    if nanoseconds:
        return nanoseconds / 1e9
    try:
        fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class DatabaseCpu:
    """CPU seconds of the server processes serving ``dbname`` over a window.

    Sessions that exist at the start and at the end count their difference;
    sessions opened in the window count whole; sessions closed in the window
    are lost (``gone`` says how many). Read through ``admin`` (a session in
    another database, so the reads are not counted)."""

    def __init__(self, admin: psycopg.Connection[Any], dbname: str) -> None:
        self.admin, self.dbname = admin, dbname
        self.before: dict[int, float] = {}
        self.gone = 0

    def pids(self) -> list[int]:
        rows = self.admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", [self.dbname]
        ).fetchall()
        return [int(r[0]) for r in rows]

    def sample(self) -> dict[int, float]:
        if not (PROC / "self" / "stat").exists():
            raise CpuUnavailable("no /proc on this platform")
        cpu = {}
        for pid in self.pids():
            value = backend_cpu(pid)
            if value is not None:
                cpu[pid] = value
        if cpu and not any(_comm(pid) == "postgres" for pid in cpu):
            raise CpuUnavailable("PostgreSQL is not a local process")
        if not cpu:
            raise CpuUnavailable("PostgreSQL is not a local process (no backend in /proc)")
        return cpu

    def start(self) -> None:
        self.before = self.sample()

    def seconds(self) -> float:
        after = self.sample()
        self.gone = len(set(self.before) - set(after))
        return sum(v - self.before.get(pid, 0.0) for pid, v in after.items())


def _comm(pid: int) -> str:
    try:
        return (PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


if __name__ == "__main__":
    if sys.argv[1:2] == ["_child"]:
        child_main()
