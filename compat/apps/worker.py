"""The suite's app as its ``celery worker`` builds it: ``celery -A compat.apps.worker``.

The suite passes the URLs and the run's namespace through the environment
(never on the command line, so passwords stay out of ``ps``).
"""

from __future__ import annotations

import os

from compat.apps.suite_app import make_app

app = make_app(
    broker=os.environ["COMPAT_BROKER"],
    backend=os.environ["COMPAT_BACKEND"],
    namespace=os.environ["COMPAT_NAMESPACE"],
)
