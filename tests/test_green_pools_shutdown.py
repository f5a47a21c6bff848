"""gevent and eventlet workers shut down cleanly.

The result backend's and durable steps' connection pools (pgbroker.database.pools)
used to be left to their finalisers, which ran while the interpreter was
tearing down and printed, at every shutdown of a gevent or eventlet worker::

    Exception ignored in: <function ConnectionPool.__del__ ...>
    RuntimeError: greenlet is being finalized

They are now closed at ``worker_shutdown`` (and at exit). A real worker runs
a task round trip and is stopped with SIGTERM.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import signal
import subprocess

import celery
import pytest

from tests.celery_helpers import execute, wait_until
from tests.test_backend_e2e import CELERY, ROOT, T, database


def installed(module: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None, reason=f"{module} not installed"
    )


@pytest.mark.parametrize(
    "pool",
    [
        pytest.param("gevent", marks=installed("gevent")),
        pytest.param(
            "eventlet",
            marks=[
                installed("eventlet"),
                # Celery 5.5's SIGTERM handler writes with eventlet's green
                # os.write from the hub and the worker exits 1 (eventlet >=
                # 0.37); fixed in Celery 5.6 (safe_say).
                pytest.mark.skipif(
                    celery.VERSION[:2] < (5, 6), reason="Celery 5.5: eventlet warm shutdown"
                ),
            ],
        ),
    ],
)
def test_green_worker_shuts_down_without_finaliser_errors(
    pool: str, pg_admin_url: str, template_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with database(pg_admin_url, template_db) as url:
        monkeypatch.setenv("GREEN_URL", url)
        from tests.apps import green_app

        importlib.reload(green_app)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        worker = subprocess.Popen(
            [
                *(CELERY, "-A", "tests.apps.green_app", "worker", "-P", pool, "-c", "3"),
                *("-l", "warning", "--without-gossip", "--without-mingle", "--without-heartbeat"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert green_app.add.delay(2, 3).get(timeout=T) == 5
            # The worker is idle: the task's message is acked.
            wait_until(
                lambda: not execute(url, "SELECT 1 FROM pgbroker.message"), T, "the task's ack"
            )
            worker.send_signal(signal.SIGTERM)  # a warm shutdown
            _, stderr = worker.communicate(timeout=30)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
            green_app.app.close()
    assert worker.returncode == 0, stderr
    assert "Exception ignored" not in stderr, stderr
    assert "greenlet is being finalized" not in stderr, stderr
