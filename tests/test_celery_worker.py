"""A stock Celery app on pgbroker, driven through real ``celery`` processes.

The app (tests/apps/basic.py) is configured by its broker URL alone and never
imports pgbroker: the URL scheme resolves through the installed .pth file.
"""

from __future__ import annotations

import re
import signal
import socket
import time
from pathlib import Path

import pytest
from celery import chain, group

from tests.celery_helpers import (
    celery_env,
    client_app,
    run_celery,
    start_worker,
    started,
    with_password,
)

APP = "tests.apps.basic"
RESULT_TIMEOUT = 30


def with_scheme(url: str, scheme: str) -> str:
    return scheme + "://" + url.partition("://")[2]


def node_name(name: str) -> str:
    return f"{name}@{socket.gethostname()}"


def test_tasks_inspect_and_shutdown(db_url: str, tmp_path: Path) -> None:
    url, password = with_password(db_url)
    env = celery_env(url)
    with start_worker(APP, env, tmp_path) as worker, client_app(APP, url) as tasks:
        worker.wait_for_log("ready.")

        assert tasks.add.delay(2, 3).get(timeout=RESULT_TIMEOUT) == 5
        # The work runs in the prefork children, not in the main process.
        pids = group(tasks.worker_pid.s() for _ in range(6))().get(timeout=RESULT_TIMEOUT)
        assert worker.pid not in pids
        assert set(pids) <= set(worker.group_pids())
        # A chain: each link is published by the worker that ran the last one.
        assert (
            chain(tasks.add.s(1, 2), tasks.mul.s(10), tasks.add.s(5))().get(timeout=RESULT_TIMEOUT)
            == 35
        )

        # inspect ping: a broadcast on the pidbox fanout exchange, answered
        # through the reply exchange that this other process bound.
        ping = run_celery(
            APP, ["inspect", "ping", "-d", node_name("worker"), "--timeout", "20"], env
        )
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert f"{node_name('worker')}: OK" in ping.stdout
        assert "pong" in ping.stdout

        # shutdown is not answered (the worker stops instead), so celery
        # reports "No nodes replied" exactly as with Redis or RabbitMQ.
        shutdown = run_celery(APP, ["control", "shutdown", "-d", node_name("worker")], env)
        assert worker.wait_exit(timeout=30) == 0, shutdown.stdout + shutdown.stderr
        log = worker.log()
        assert "Got shutdown from remote" in log

    # The banner shows the URL with the password masked, and no log line,
    # here or in the control commands' output, carries the password.
    assert f"transport:   {with_scheme(url, 'postgresql').replace(password, '**')}" in log
    assert password not in log
    assert password not in ping.stdout + ping.stderr + shutdown.stdout + shutdown.stderr


def test_events_dump_shows_worker_and_task_events(db_url: str, tmp_path: Path) -> None:
    url, password = with_password(db_url)
    env = celery_env(url)
    with (
        start_worker(APP, env, tmp_path, extra=("-E",)) as worker,
        client_app(APP, url) as tasks,
    ):
        worker.wait_for_log("ready.")
        with started("events", APP, ["events", "--dump"], env, tmp_path) as events:
            # The receiver binds its queue when it starts; tasks sent before
            # that would be missed, so keep sending until it sees one whole
            # (bound between a task's received and succeeded events, it
            # sees only the second).
            deadline = time.monotonic() + 40
            while not all(e in events.log() for e in ("task received", "task succeeded")):
                assert time.monotonic() < deadline, f"no task events:\n{events.log()}"
                assert tasks.add.delay(20, 22).get(timeout=RESULT_TIMEOUT) == 42
                time.sleep(0.5)
            # The worker sends a heartbeat event every 2 s.
            events.wait_for_log("] heartbeat: ", timeout=20)
            events.signal(signal.SIGINT)
            events.wait_exit(timeout=15)
            dump = events.log()
    assert "task received" in dump
    assert "task started" in dump
    assert "tests.apps.basic.add" in dump
    assert f"{node_name('worker')} [" in dump
    assert password not in dump + worker.log()


def test_beat_sends_periodic_tasks(db_url: str, tmp_path: Path) -> None:
    url, password = with_password(db_url)
    env = celery_env(url)
    schedule = str(tmp_path / "beat-schedule")
    with (
        start_worker(APP, env, tmp_path) as worker,
        started("beat", APP, ["beat", "-l", "info", "-s", schedule], env, tmp_path) as beat,
    ):
        worker.wait_for_log("ready.")

        deadline = time.monotonic() + 40
        # Three ticks received and run: beat publishes every second.
        while worker.log().count("Task tests.apps.basic.tick[") < 6:
            assert time.monotonic() < deadline, (
                f"beat's ticks did not run:\n--- beat ---\n{beat.log()}\n"
                f"--- worker ---\n{worker.log()}"
            )
            time.sleep(0.2)
        assert "Sending due task tick (tests.apps.basic.tick)" in beat.log()
        runs = re.findall(
            r"Task tests\.apps\.basic\.tick\[[-0-9a-f]+\] succeeded in .*'tock'", worker.log()
        )
        assert len(runs) >= 2
        # beat's banner shows the broker URL, masked.
        assert f"broker -> {with_scheme(url, 'postgresql').replace(password, '**')}" in beat.log()
        assert password not in beat.log() + worker.log()


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "pgbroker"])
def test_url_schemes(db_url: str, tmp_path: Path, scheme: str) -> None:
    url = with_scheme(db_url, scheme)
    env = celery_env(url)
    with start_worker(APP, env, tmp_path) as worker, client_app(APP, url) as tasks:
        log = worker.wait_for_log("ready.")
        assert f"transport:   {scheme}://" in log
        assert tasks.add.delay(40, 2).get(timeout=RESULT_TIMEOUT) == 42
