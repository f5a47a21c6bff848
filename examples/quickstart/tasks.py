"""The quickstart's tasks: a stock Celery app whose broker is PostgreSQL.

Nothing here is specific to pgbroker except the URLs: installing pgbroker is
what makes Celery understand ``postgresql://`` broker and result backend
URLs. The example keeps its tables in a schema of its own
(``PGBROKER_EXAMPLE_SCHEMA``, default ``pgbroker_quickstart``), so it never
touches an application's ``pgbroker`` schema or its queues.
"""

from __future__ import annotations

import os

from celery import Celery

DATABASE_URL = os.environ.get("PGBROKER_URL", "postgresql://localhost/postgres")
SCHEMA = os.environ.get("PGBROKER_EXAMPLE_SCHEMA", "pgbroker_quickstart")

app = Celery("quickstart")
app.conf.broker_url = DATABASE_URL
# Results are rows in PostgreSQL too: pgbroker's own result backend.
app.conf.result_backend = DATABASE_URL
app.conf.broker_transport_options = {"schema": SCHEMA}
app.conf.result_backend_transport_options = {"schema": SCHEMA}


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def mul(x: int, y: int) -> int:
    return x * y


@app.task
def square(x: int) -> int:
    return x * x
