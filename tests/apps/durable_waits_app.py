"""A Celery app for exclusive runs, exclusive keys, durable waits and the
stored-result check of DurableTask, in real worker processes.

Bodies record what they did in tables of the broker's own database (created
by the tests): ``span`` (one row per body run: key, pid, start and end
times, from the database clock) and ``effect`` (one row per step body). The
result backend is pgbroker on the same database (in its own schema when
``TEST_RESULTS`` is ``apart``: then a task's result and its ack do not
commit together), unless ``TEST_RESULTS`` is ``rpc``. Files passed as
arguments coordinate with the test: a task writes ``pause_file`` when it
reached the point the test waits for, and waits for
``release_file`` to exist before going on.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
from celery import Celery
from celery.signals import task_success

from pgbroker.durable import DurableTask, EventTimeout
from pgbroker.durable.waits import parks_of

BROKER_URL = os.environ["TEST_BROKER_URL"]

app = Celery("durable_waits_app")
app.conf.broker_url = BROKER_URL
app.conf.result_backend = "rpc://" if os.environ.get("TEST_RESULTS") == "rpc" else BROKER_URL
app.conf.broker_transport_options = {
    "sweep_interval": float(os.environ.get("TEST_SWEEP_INTERVAL", "0.5"))
}
app.conf.worker_prefetch_multiplier = 1
app.conf.task_acks_late = True
if os.environ.get("TEST_RESULTS") == "apart":
    app.conf.result_backend_transport_options = {"schema": "results_apart"}
app.conf.task_reject_on_worker_lost = True


def _db() -> psycopg.Connection:
    return psycopg.connect("postgresql://" + BROKER_URL.partition("://")[2], autocommit=True)


def _effect(key: str, step: str) -> str:
    with _db() as conn:
        conn.execute(
            "INSERT INTO effect (key, step, pid) VALUES (%s, %s, %s)", (key, step, os.getpid())
        )
    return f"{step}-{key}"


class _Span:
    """Records one body run: its start, and its end when the body returns."""

    def __init__(self, key: str) -> None:
        with _db() as conn:
            row = conn.execute(
                "INSERT INTO span (key, pid, started) VALUES (%s, %s, clock_timestamp()) "
                "RETURNING id",
                (key, os.getpid()),
            ).fetchone()
        assert row is not None
        self.id = row[0]

    def end(self) -> None:
        with _db() as conn:
            conn.execute("UPDATE span SET ended = clock_timestamp() WHERE id = %s", (self.id,))


def _signal(pause_file: str) -> None:
    if pause_file:
        tmp = f"{pause_file}.{os.getpid()}.tmp"
        Path(tmp).write_text(str(os.getpid()))
        os.rename(tmp, pause_file)  # appears complete


def _wait_for(release_file: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while release_file and not os.path.exists(release_file):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release_file} never appeared")
        time.sleep(0.05)


# --- one run per task id -------------------------------------------------------------


@app.task(shared=False, bind=True, base=DurableTask)
def long_job(self: DurableTask, key: str, pause_file: str, release_file: str) -> dict[str, Any]:
    """Step one, then (first run only) tell the test and wait, then step two."""
    span = _Span(key)
    one = self.step("one", _effect, key, "one")
    if not os.path.exists(pause_file):
        _signal(pause_file)
        _wait_for(release_file)
    two = self.step("two", _effect, key, "two")
    span.end()
    return {"one": one, "two": two, "pid": os.getpid()}


# --- exclusive keys ------------------------------------------------------------------


def _per_customer(self: DurableTask, customer: int, tag: str, release_file: str) -> str:
    span = _Span(f"customer:{customer}:{tag}")
    _signal(f"{release_file}.{tag}.started")
    _wait_for(release_file)
    span.end()
    return f"{tag} done"


wait_for_key = app.task(
    shared=False,
    bind=True,
    base=DurableTask,
    exclusive_key="customer:{customer}",
    on_conflict="wait",
    name="durable_waits_app.wait_for_key",
)(_per_customer)
skip_on_key = app.task(
    shared=False,
    bind=True,
    base=DurableTask,
    exclusive_key="customer:{customer}",
    on_conflict="skip",
    name="durable_waits_app.skip_on_key",
)(_per_customer)
retry_on_key = app.task(
    shared=False,
    bind=True,
    base=DurableTask,
    exclusive_key="customer:{customer}",
    on_conflict="retry",
    exclusive_countdown=0.5,
    max_retries=None,
    name="durable_waits_app.retry_on_key",
)(_per_customer)


# --- durable waits -------------------------------------------------------------------


@app.task(shared=False, bind=True, base=DurableTask, max_retries=1)
def approval_flow(self: DurableTask, order: int, timeout: float = 3600) -> dict[str, Any]:
    """Prepare, wait for "approval:<order>", finish."""
    key = f"order:{order}"
    prepared = self.step("prepare", _effect, key, "prepare")
    try:
        answer = self.wait_for_event(f"approval:{order}", timeout=timeout)
    except EventTimeout:
        answer = "timed out"
    finished = self.step("finish", _effect, key, "finish")
    return {"prepared": prepared, "answer": answer, "finished": finished, "pid": os.getpid()}


@app.task(shared=False, bind=True, base=DurableTask, max_retries=1)
def napper(self: DurableTask, key: str, retry_file: str) -> dict[str, Any]:
    """Two durable sleeps (two parks), then one retry of its own: with
    max_retries=1 it succeeds only if parks do not count as retries."""
    self.step("before", _effect, key, "before")
    self.sleep("first nap", 0.5)
    self.sleep("second nap", 0.5)
    if not os.path.exists(retry_file):
        Path(retry_file).touch()
        raise self.retry(countdown=0.2)
    self.step("after", _effect, key, "after")
    return {"retries": self.request.retries, "parks": parks_of(self)}


@app.task(shared=False)
def quick(x: int) -> int:
    return x + 1


# --- a stored SUCCESS is final -------------------------------------------------------


@app.task(shared=False, bind=True, base=DurableTask)
def succeed_then_die(self: DurableTask, key: str, marker: str) -> str:
    _Span(key).end()
    return f"result of {key}"


@task_success.connect(sender=succeed_then_die)
def _die_after_success(sender: Any = None, result: Any = None, **_: Any) -> None:
    """First delivery only: the result is stored, the message not yet acked;
    the whole worker dies (its main process too, which would otherwise see
    the stored success and ack)."""
    marker = sender.request.kwargs.get("marker") if sender is not None else None
    if marker and not os.path.exists(marker):
        Path(marker).touch()
        os.killpg(os.getpgid(0), signal.SIGKILL)
