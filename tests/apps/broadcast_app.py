"""A Celery app with a kombu.common.Broadcast queue in task_queues
(tests/test_auto_delete.py): every worker start declares a bcast.<uuid>
queue, which must go when the worker goes. ``TEST_BROKER_URL``."""

from __future__ import annotations

import logging
import os

from celery import Celery
from kombu import Queue
from kombu.common import Broadcast

BROKER_URL = os.environ["TEST_BROKER_URL"]

app = Celery("broadcast_app")
app.conf.broker_url = BROKER_URL
app.conf.broker_connection_retry_on_startup = True
app.conf.broker_transport_options = {"sweep_interval": 1.0}
app.conf.task_queues = (Queue("celery"), Broadcast("broadcast_tasks"))
app.conf.task_routes = {"broadcast_app.shout": {"queue": "broadcast_tasks"}}

logger = logging.getLogger(__name__)


@app.task(shared=False, name="broadcast_app.shout", ignore_result=True)
def shout(text: str) -> None:
    logger.warning("shouted %s", text)
