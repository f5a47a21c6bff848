"""Metrics of a pgbroker schema, for Prometheus and for code.

Two ways to watch pgbroker, reading the same numbers:

* SQL views (``migrations/008_operations.sql``): ``queue_stats``,
  ``broker_stats``, ``result_stats`` and ``table_sizes`` in the pgbroker
  schema, for Grafana's PostgreSQL data source or any SQL client;
* a Prometheus exporter, ``pgbroker metrics --port 9808``: every scrape runs
  one query over those views and answers in the Prometheus text format.
  It needs ``prometheus_client`` (``pip install "pgbroker[metrics]"``;
  Flower installs it too).

The metrics (docs/operations.md explains how to alert on them):

``pgbroker_up``
    1 if the last scrape could read the database, else 0.
``pgbroker_queue_messages{queue,state}``
    Messages per queue and state: ``ready`` (waiting), ``reserved``
    (claimed by a consumer, not yet acked: prefetched or running) and
    ``delayed`` (not visible yet).
``pgbroker_queue_oldest_ready_age_seconds{queue}``
    How long the message next in line has waited: the queue's latency
    (0 when nothing is ready).
``pgbroker_queue_dead_letters{queue}``, ``pgbroker_queue_consumers{queue}``
    Dead letters per queue (``queue=""``: unroutable), consumers attached.
``pgbroker_consumers{state}``
    Consumer sessions, ``alive`` or ``dead`` (a dead one is cleared by the
    next sweep, which requeues its messages).
``pgbroker_messages_stored_total``, ``pgbroker_messages_removed_total``
    Counters: messages stored (published, one per queue routed to) and
    messages that left the table (acked, almost always; also purged,
    expired, rejected). ``rate()`` of each is the publish and consume
    throughput.
``pgbroker_redeliveries_total``, ``pgbroker_dead_lettered_total``
    Counters of redeliveries (a consumer died holding the message) and of
    messages dead-lettered. Pruning the logs does not lower them.
``pgbroker_dead_letters``
    Dead letters present, all queues.
``pgbroker_task_results_completed{state,window}``
    Results that reached a ready state (SUCCESS, FAILURE, REVOKED) in the
    last ``1m``, ``5m`` and ``1h`` (pgbroker result backend only).
``pgbroker_table_size_bytes{table}``, ``pgbroker_table_dead_rows{table}``
    Disk used per table (indexes and TOAST included) and dead tuples
    waiting for vacuum: what pruning and autovacuum keep bounded.
``pgbroker_scrape_duration_seconds``
    Time the scrape's query took.

Celery's internal queues (``*.pidbox``, ``celeryev.*``: one per worker
process and event receiver) are left out of the per-queue metrics unless
``all_queues`` is set, so that labels do not churn.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg

from pgbroker.database import queries
from pgbroker.errors import ConfigurationError, SchemaError
from pgbroker.operations.admin import is_internal_queue, open_connection
from pgbroker.urls import redact

logger = logging.getLogger("pgbroker.operations")

#: The exporter's default port.
DEFAULT_PORT = 9808


@dataclasses.dataclass
class QueueMetrics:
    queue: str | None
    ready: int
    reserved: int
    delayed: int
    dead_letters: int
    #: Seconds; None when nothing is ready.
    oldest_ready_age: float | None
    consumers: int
    declared: bool


@dataclasses.dataclass
class Snapshot:
    queues: list[QueueMetrics]
    #: The broker_stats view's one row, by column name.
    broker: dict[str, int]
    #: state -> {"last_minute": n, "last_5_minutes": n, "last_hour": n}
    results: dict[str, dict[str, int]]
    #: table -> the table_sizes view's row
    tables: dict[str, dict[str, Any]]
    #: Seconds the query took.
    took: float


def snapshot(conn: psycopg.Connection, schema: str, *, all_queues: bool = False) -> Snapshot:
    """Read every metric in one query."""
    query = queries.for_schema(schema, "admin.sql")["metrics"]
    started = time.perf_counter()
    try:
        row = conn.execute(query).fetchone()
    except psycopg.errors.UndefinedTable:
        raise SchemaError(
            f"schema {schema!r} has no monitoring views (added by migration 8): run "
            "`pgbroker migrate`, or start a worker of this pgbroker version"
        ) from None
    took = time.perf_counter() - started
    assert row is not None
    queues = [
        QueueMetrics(
            queue=q["queue"],
            ready=q["ready"],
            reserved=q["reserved"],
            delayed=q["delayed"],
            dead_letters=q["dead_letters"],
            oldest_ready_age=q["oldest_ready_age"],
            consumers=q["consumers"],
            declared=q["declared"],
        )
        for q in row[0]
        if all_queues or not is_internal_queue(q["queue"])
    ]
    queues.sort(key=lambda q: (q.queue is None, q.queue or ""))
    results = {r["state"]: {k: v for k, v in r.items() if k != "state"} for r in row[2]}
    tables = {t["table"]: t for t in row[3]}
    return Snapshot(queues=queues, broker=row[1], results=results, tables=tables, took=took)


# --- Prometheus ----------------------------------------------------------------------


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigurationError(
            "the Prometheus exporter needs prometheus_client: "
            'pip install "pgbroker[metrics]" (or prometheus_client; Flower installs it too)'
        ) from None
    return prometheus_client


def families(snap: Snapshot | None) -> Iterator[Any]:
    """Prometheus metric families of a snapshot; None: the database could
    not be read (only ``pgbroker_up 0``)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    up = GaugeMetricFamily("pgbroker_up", "1 if the last scrape could read the database")
    up.add_metric([], 0 if snap is None else 1)
    yield up
    if snap is None:
        return

    def gauge(name: str, doc: str, labels: list[str]) -> Any:
        return GaugeMetricFamily(name, doc, labels=labels)

    messages = gauge("pgbroker_queue_messages", "Messages per queue and state", ["queue", "state"])
    age = gauge(
        "pgbroker_queue_oldest_ready_age_seconds",
        "Seconds the oldest ready message of the queue has waited (0: none ready)",
        ["queue"],
    )
    dead = gauge("pgbroker_queue_dead_letters", "Dead letters per queue", ["queue"])
    attached = gauge("pgbroker_queue_consumers", "Consumers attached to the queue", ["queue"])
    for q in snap.queues:
        name = q.queue or ""
        messages.add_metric([name, "ready"], q.ready)
        messages.add_metric([name, "reserved"], q.reserved)
        messages.add_metric([name, "delayed"], q.delayed)
        age.add_metric([name], q.oldest_ready_age or 0.0)
        dead.add_metric([name], q.dead_letters)
        attached.add_metric([name], q.consumers)
    yield from (messages, age, dead, attached)

    b = snap.broker
    consumers = gauge("pgbroker_consumers", "Consumer sessions, alive or dead", ["state"])
    consumers.add_metric(["alive"], b["consumers_alive"])
    consumers.add_metric(["dead"], b["consumers_dead"])
    yield consumers
    for name, column, doc in (
        ("pgbroker_messages_stored", "messages_stored_total", "Messages stored (published)"),
        (
            "pgbroker_messages_removed",
            "messages_removed_total",
            "Messages removed from the queues (acked, purged, expired, rejected)",
        ),
        ("pgbroker_redeliveries", "redeliveries_total", "Messages redelivered after a crash"),
        ("pgbroker_dead_lettered", "dead_lettered_total", "Messages dead-lettered"),
    ):
        counter = CounterMetricFamily(name, doc)
        counter.add_metric([], b[column])
        yield counter
    yield GaugeMetricFamily("pgbroker_dead_letters", "Dead letters present", b["dead_letters"])
    yield GaugeMetricFamily(
        "pgbroker_messages_present", "Messages in the message table", b["messages_present"]
    )

    completed = gauge(
        "pgbroker_task_results_completed",
        "Task results that reached a ready state within the window",
        ["state", "window"],
    )
    for state, counts in sorted(snap.results.items()):
        completed.add_metric([state, "1m"], counts["last_minute"])
        completed.add_metric([state, "5m"], counts["last_5_minutes"])
        completed.add_metric([state, "1h"], counts["last_hour"])
    yield completed

    size = gauge("pgbroker_table_size_bytes", "Disk used by the table, indexes included", ["table"])
    dead_rows = gauge("pgbroker_table_dead_rows", "Dead tuples waiting for vacuum", ["table"])
    for table, t in sorted(snap.tables.items()):
        size.add_metric([table], t["total_bytes"])
        dead_rows.add_metric([table], t["dead_rows"] or 0)
    yield from (size, dead_rows)
    yield GaugeMetricFamily(
        "pgbroker_scrape_duration_seconds", "Seconds the metrics query took", snap.took
    )


def render(snap: Snapshot | None) -> bytes:
    """A snapshot in the Prometheus text format."""
    prometheus_client = _prometheus()

    class _Once:
        def collect(self) -> Iterator[Any]:
            return families(snap)

    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(_Once())
    return bytes(prometheus_client.generate_latest(registry))


class Collector:
    """A Prometheus collector that reads the database at each scrape.

    It keeps one connection and opens a new one after an error; scrapes
    are serialized (one query at a time on the connection). A scrape that
    cannot reach the database reports ``pgbroker_up 0`` instead of failing.
    """

    def __init__(self, url: str, schema: str, *, all_queues: bool = False) -> None:
        self.url = url
        self.schema = schema
        self.all_queues = all_queues
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()

    def read(self) -> Snapshot | None:
        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = open_connection(self.url, self.schema)
                return snapshot(self._conn, self.schema, all_queues=self.all_queues)
            except (psycopg.Error, SchemaError) as exc:
                logger.warning("pgbroker metrics: scrape failed: %s", redact(str(exc), self.url))
                self.close()
                return None

    def collect(self) -> Iterator[Any]:
        return families(self.read())

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def serve(
    url: str,
    schema: str,
    *,
    port: int = DEFAULT_PORT,
    addr: str = "0.0.0.0",
    all_queues: bool = False,
) -> tuple[Any, Collector]:
    """Start the exporter's HTTP server in a thread; return (server, collector).

    ``server.shutdown()`` stops it.
    """
    prometheus_client = _prometheus()
    collector = Collector(url, schema, all_queues=all_queues)
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, _thread = prometheus_client.start_http_server(port, addr=addr, registry=registry)
    return server, collector
