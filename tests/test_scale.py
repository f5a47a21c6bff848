"""Throughput holds as consumers are added to one queue.

What made it drop (compat/bench_scale.py, 64 consumers on one queue at
0.45x of one): every consumer ran the periodic sweep on its first
``drain_events``, so 64 consumers starting together sent 64 sweeps at once,
ahead of their first claims. Consumers of one process now share the sweep
(``ConsumerSession._take_sweep``); the first test pins that mechanism, the
second the figure (with a margin, best of three rounds: a loaded machine
only makes a round slower).
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue

from compat import bench_backlog, bench_scale
from pgbroker.broker.transport import Transport
from tests.kombu_helpers import connect


def count_sweeps(monkeypatch: pytest.MonkeyPatch) -> Counter[int]:
    """Sweep statements, by consumer id."""
    sweeps: Counter[int] = Counter()
    run = Transport.run

    def counting(self: Transport, query: str, /, **params: Any) -> Any:
        if query == "sweep":
            sweeps[self.consumer_id or 0] += 1
        return run(self, query, **params)

    monkeypatch.setattr(Transport, "run", counting)
    return sweeps


@pytest.mark.parametrize("same_queue", [True, False])
def test_consumers_of_one_process_share_the_sweep(
    db_url: str, monkeypatch: pytest.MonkeyPatch, same_queue: bool
) -> None:
    """Eight consumers of one process starting together: one sweep when
    they consume the same queue (it promotes for all of them), one each
    when their queues differ (each sweep promotes its consumer's queues).
    Without fast_recovery, whose thread would make every consumer skip it."""
    sweeps = count_sweeps(monkeypatch)
    names = ["shared"] * 8 if same_queue else [f"own-{i}" for i in range(8)]
    conns = [connect(db_url, fast_recovery=False, sweep_interval=30) for _ in names]
    try:
        for conn, name in zip(conns, names, strict=True):
            Queue(name)(conn.channel()).declare()
            conn.transport.attach(name)
        start = threading.Barrier(len(conns))

        def first_drain(conn: Connection) -> None:
            start.wait()
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.05)

        threads = [threading.Thread(target=first_drain, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(sweeps.values()) == (1 if same_queue else len(conns)), sweeps
        if same_queue:
            # The others sweep next when the shared sweep is due again, not later.
            due = {round(c.transport._next_sweep, 3) for c in conns}
            assert max(due) - min(due) < 1.0, due
    finally:
        for conn in conns:
            conn.release()


CONSUMERS = 32
MESSAGES = 6400


def drain_rate(url: str, consumers: int, name: str, workdir: Path) -> float:
    exchange = Exchange("scale", type="direct", durable=True)
    queue = Queue(name, exchange, routing_key=name, durable=True)
    bench_backlog.fill(url, exchange, queue, MESSAGES, {"x": "y" * 180})
    return bench_scale.run_consumers(
        url,
        {},
        "scale",
        bench_scale.assignment(consumers, [name]),
        MESSAGES,
        100,
        workdir,
        timeout=60,
        idle_stop=0.5,
    )


@pytest.mark.slow
def test_many_consumers_on_one_queue_keep_the_throughput_of_one(
    db_url: str, tmp_path: Path
) -> None:
    """32 consumers (each its own session, threads of four processes, as
    compat/bench_scale.py runs them) drain a backlog of one queue at 0.7x
    or more of one consumer's rate. Measured on the 2-core test machine:
    0.79x to 0.88x; 0.71x to 0.72x when each consumer swept on its own
    first (too close to tell apart on a shared machine: the sweep count
    above pins that; this one catches a larger fall, such as the 0.38x that
    compat.bench measured at 32 consumers before)."""
    free = bench_scale.free_connections(db_url)
    if free < CONSUMERS + bench_scale.CONNECTION_HEADROOM:
        pytest.skip(f"{CONSUMERS} consumers need more free connections than {free}")
    one = [drain_rate(db_url, 1, f"one-{r}", tmp_path) for r in range(3)]
    many = [drain_rate(db_url, CONSUMERS, f"many-{r}", tmp_path) for r in range(3)]
    ratio = max(many) / max(one)
    print(f"1 consumer {max(one):.0f} msg/s, {CONSUMERS} consumers {max(many):.0f}: {ratio:.2f}x")
    assert ratio >= 0.7, (one, many)
