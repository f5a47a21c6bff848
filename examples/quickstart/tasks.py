"""The quickstart's tasks: a stock Celery app whose broker is PostgreSQL.

Nothing here is specific to pgbroker except the URL: installing pgbroker is
what makes Celery understand ``postgresql://`` broker URLs.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("quickstart")
app.conf.broker_url = os.environ.get("PGBROKER_URL", "postgresql://localhost/postgres")
# Results come back as messages through the broker, that is, through PostgreSQL.
app.conf.result_backend = "rpc://"


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def mul(x: int, y: int) -> int:
    return x * y


@app.task
def square(x: int) -> int:
    return x * x
