"""A Celery app whose worker loses its pgbroker session at chosen startup steps
(tests/test_startup_sessions_lost.py).

pgbroker is the broker and the result backend. With ``STARTUP_FAULTS`` set
(a comma-separated list of pgbroker query names, as in the ``/* pgbroker
<name> */`` comment each statement starts with), the worker's main process
ends its own session just before the first run of each named statement:
another connection (``application_name`` ``startup-faults``) runs
``pg_terminate_backend`` on the session's backend and waits until it is
gone, so the statement then fails exactly as after the chaos test's
session killer. Each fault is logged as ``startup fault: ...``.

The hook wraps ``psycopg.Cursor.execute`` (every statement goes through it)
and is installed at ``worker_init``, in the worker's main process only: a
client that imports this app (``client_app``) and the prefork children run
unchanged.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Any

import psycopg
from celery import Celery, signals

BROKER_URL = os.environ["TEST_BROKER_URL"]
FAULTS = frozenset(filter(None, os.environ.get("STARTUP_FAULTS", "").split(",")))

app = Celery("startup_faults_app")
app.conf.broker_url = BROKER_URL
app.conf.result_backend = BROKER_URL
app.conf.broker_connection_retry_on_startup = True

logger = logging.getLogger("startup_faults")

_NAME = re.compile(r"/\* pgbroker (\w+) \*/")
_lock = threading.Lock()
_pending = set(FAULTS)  # faults not injected yet


@app.task(shared=False)
def add(x: int, y: int) -> int:
    return x + y


def _query_text(cur: psycopg.Cursor[Any], query: Any) -> str:
    if isinstance(query, bytes):
        return query.decode(errors="replace")
    if isinstance(query, str):
        return query
    try:
        return str(query.as_string(cur.connection))
    except Exception:  # not a statement this hook is after
        return ""


def _terminate(pid: int) -> None:
    """End backend ``pid`` from another session; return once it is gone."""
    url = "postgresql://" + BROKER_URL.partition("://")[2]
    with psycopg.connect(url, autocommit=True, application_name="startup-faults") as side:
        side.execute("SELECT pg_terminate_backend(%s)", [pid])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if side.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone():
                time.sleep(0.01)
            else:
                return
    raise AssertionError(f"backend {pid} still there 10 s after pg_terminate_backend")


def _install(main_pid: int) -> None:
    original = psycopg.Cursor.execute

    def execute(self: psycopg.Cursor[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        if _pending and os.getpid() == main_pid:
            match = _NAME.search(_query_text(self, query)[:200])
            name = match.group(1) if match else None
            conn = self.connection
            app_name = conn.info.parameter_status("application_name") or ""
            with _lock:
                fire = name in _pending and app_name.startswith("pgbroker:")
                if fire:
                    _pending.discard(name)
            if fire:
                pid = conn.info.backend_pid
                _terminate(pid)
                logger.warning("startup fault: terminated session %s before %s", pid, name)
        return original(self, query, *args, **kwargs)

    psycopg.Cursor.execute = execute  # type: ignore[method-assign]


@signals.worker_init.connect(weak=False)
def _on_worker_init(**_: Any) -> None:
    if FAULTS:
        _install(os.getpid())
