"""A Celery app whose long task survives the SIGKILL of its worker.

``long_once`` uses ``acks_late``: the message is acknowledged only after the
task returns, so a worker killed mid-task leaves it unacknowledged and
pgbroker's sweep hands it to another worker. Each attempt is recorded in the
``attempt`` table of the broker's own database (created by the test), so the
test sees every run, including those of the killed worker.
"""

from __future__ import annotations

import os
import time

import psycopg
from celery import Celery

BROKER_URL = os.environ["TEST_BROKER_URL"]

app = Celery("recovery")
app.conf.broker_url = BROKER_URL
app.conf.result_backend = "rpc://"
if "TEST_SWEEP_INTERVAL" in os.environ:
    # Fast recovery in tests; the default is 10 s.
    app.conf.broker_transport_options = {"sweep_interval": float(os.environ["TEST_SWEEP_INTERVAL"])}
# One task at a time per process: nothing else is reserved behind it.
app.conf.worker_prefetch_multiplier = 1


def _db() -> psycopg.Connection:
    return psycopg.connect("postgresql://" + BROKER_URL.partition("://")[2], autocommit=True)


@app.task(shared=False, acks_late=True)
def long_once(key: str, seconds: float) -> str:
    """Sleep ``seconds`` on the first attempt only; return at once after that."""
    with _db() as conn:
        attempt = conn.execute(
            "INSERT INTO attempt (key, pid, started) VALUES (%s, %s, %s) "
            "RETURNING (SELECT count(*) FROM attempt WHERE key = %s) + 1",
            (key, os.getpid(), time.time(), key),
        ).fetchone()[0]  # type: ignore[index]
    if attempt == 1:
        time.sleep(seconds)
    return f"{key} done on attempt {attempt}"
