"""The Celery app of the delivery-semantics tests (ETA, expiry, exactly-once
chain hand-off, max deliveries).

pgbroker is both broker and result backend (``TEST_BROKER_URL``). Options
come from the environment, so the test and its workers build the same app:
``TEST_SWEEP_INTERVAL``, ``TEST_MAX_DELIVERIES``, ``TEST_MARKER_DIR`` (where
``kill_after_success`` keeps its marker), ``TEST_RESULT_SCHEMA`` (results
in a schema of their own: a backend the broker cannot finish a task with,
so each finish takes Celery's usual three commits),
``TEST_KILL_BEFORE_FINISH`` (SIGKILL the worker as ``first`` finishes,
before its finish commits, on the first delivery only).

Every run of a task is recorded in the ``run_log`` table of the broker's own
database (tests/apps/delivery_log.py).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
from celery import Celery
from celery.exceptions import Ignore
from celery.signals import task_success

from pgbroker.broker.finish import Held
from pgbroker.results.backend import PostgresBackend

BROKER_URL = os.environ["TEST_BROKER_URL"]

app = Celery("delivery_app")
app.conf.broker_url = BROKER_URL
app.conf.result_backend = BROKER_URL
app.conf.worker_prefetch_multiplier = 1
app.conf.broker_connection_retry_on_startup = True
_options: dict[str, Any] = {}
if "TEST_SWEEP_INTERVAL" in os.environ:
    _options["sweep_interval"] = float(os.environ["TEST_SWEEP_INTERVAL"])
if "TEST_MAX_DELIVERIES" in os.environ:
    _options["max_deliveries"] = int(os.environ["TEST_MAX_DELIVERIES"])
app.conf.broker_transport_options = _options
if "TEST_RESULT_SCHEMA" in os.environ:
    app.conf.result_backend_transport_options = {"schema": os.environ["TEST_RESULT_SCHEMA"]}
if "TEST_KILL_BEFORE_FINISH" in os.environ:
    app.conf.result_backend = "tests.apps.delivery_app:KillBeforeFinish"
app.conf.task_routes = {
    "delivery_app.second": {"queue": "second"},
    "delivery_app.outlive_session": {"queue": "outlive"},
}


def _db() -> psycopg.Connection:
    return psycopg.connect("postgresql://" + BROKER_URL.partition("://")[2], autocommit=True)


def _record(name: str, key: str) -> int:
    """Log this run; return how many runs of (name, key) there have been."""
    with _db() as conn:
        row = conn.execute(
            "INSERT INTO run_log (name, key, pid, at) VALUES (%s, %s, %s, %s) "
            "RETURNING (SELECT count(*) FROM run_log WHERE name = %s AND key = %s) + 1",
            (name, key, os.getpid(), time.time(), name, key),
        ).fetchone()
    assert row is not None
    return int(row[0])


@app.task(shared=False, name="delivery_app.record")
def record(key: str) -> str:
    _record("record", key)
    return key


@app.task(shared=False, name="delivery_app.first", acks_late=True)
def first(key: str) -> str:
    """A chain's first link; returns something different on each run, so a
    later run's result overwriting the first would show."""
    run = _record("first", key)
    return f"{key} run {run}"


@app.task(shared=False, name="delivery_app.outlive_session", acks_late=True, bind=True)
def outlive_session(self: Any, key: str) -> str:
    """A chain's first link that outlives its delivery's session: it runs
    until the sweep has put its message back in its queue (the test
    terminates the worker's consumer session meanwhile), then succeeds."""
    run = _record("outlive_session", key)
    deadline = time.monotonic() + 60
    with _db() as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT state FROM pgbroker.message WHERE task_id = %s", (self.request.id,)
            ).fetchone()
            if row is not None and row[0] == "ready":
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the message was not put back in its queue")
    return f"{key} run {run}"


@app.task(shared=False, name="delivery_app.second", acks_late=True)
def second(previous: str) -> str:
    _record("second", previous.split(" ")[0])
    return f"{previous} then second"


@app.task(shared=False, name="delivery_app.link")
def link(n: int) -> int:
    """A chain link that Celery acknowledges as it is delivered."""
    return n + 1


@app.task(shared=False, name="delivery_app.link_late", acks_late=True)
def link_late(n: int) -> int:
    """A chain link acknowledged after its run (acks_late)."""
    return n + 1


@app.task(shared=False, name="delivery_app.kill_worker", acks_late=True)
def kill_worker(key: str) -> None:
    """SIGKILL the whole worker (main process and pool) on every run."""
    _record("kill_worker", key)
    os.killpg(os.getpgrp(), signal.SIGKILL)


@app.task(shared=False, name="delivery_app.kill_child", acks_late=True, reject_on_worker_lost=True)
def kill_child(key: str) -> None:
    """SIGKILL the pool process running it on every run: the worker sees
    WorkerLostError and, with reject_on_worker_lost, requeues the message."""
    _record("kill_child", key)
    os.kill(os.getpid(), signal.SIGKILL)


def _send_then(self: Any, key: str, then: str) -> str:
    """Send ``record(key)`` to the queue ``second`` from the body, then end
    as ``then`` says: "succeed", "fail", "retry" (on the first run only),
    "ignore", or "kill" (SIGKILL the whole worker, on the first delivery
    only: the marker ``killed-in-body`` in TEST_MARKER_DIR)."""
    _record(self.name.rpartition(".")[2], key)
    record.apply_async((key,), queue="second")
    if then == "fail":
        raise ValueError("failed on purpose")
    if then == "retry" and self.request.retries == 0:
        raise self.retry(countdown=0)
    if then == "ignore":
        raise Ignore()
    if then == "kill":
        marker = Path(os.environ.get("TEST_MARKER_DIR", ".")) / "killed-in-body"
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.killpg(os.getpgrp(), signal.SIGKILL)
    return key


#: The same body through the task's outbox: what it sends commits with its
#: success (pgbroker/broker/finish.py), and without: sent when called.
send_then = app.task(
    shared=False, name="delivery_app.send_then", bind=True, acks_late=True, pgbroker_outbox=True
)(_send_then)
send_then_now = app.task(
    shared=False, name="delivery_app.send_then_now", bind=True, acks_late=True
)(_send_then)


@task_success.connect
def kill_after_success(sender: Any = None, **kwargs: Any) -> None:
    """After ``first`` succeeded (next link published, result stored, not yet
    acknowledged), SIGKILL the whole worker, on the first delivery only."""
    if getattr(sender, "name", None) != "delivery_app.first":
        return
    if "TEST_KILL_BEFORE_FINISH" in os.environ:
        return  # killed earlier instead
    marker = Path(os.environ.get("TEST_MARKER_DIR", ".")) / "killed-after-success"
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    os.killpg(os.getpgrp(), signal.SIGKILL)


class KillBeforeFinish(PostgresBackend):
    """pgbroker's backend, but the worker is SIGKILLed as ``first``'s finish
    is about to commit (next link held, result not stored, message not
    acknowledged), on the first delivery only."""

    def _commit(self, held: Held, params: dict[str, Any] | None) -> None:
        marker = Path(os.environ.get("TEST_MARKER_DIR", ".")) / "killed-before-finish"
        handing_on = [m["task_name"] for _, m in held.messages] == ["delivery_app.second"]
        if handing_on and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.killpg(os.getpgrp(), signal.SIGKILL)
        super()._commit(held, params)
