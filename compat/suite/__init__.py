"""The compatibility suite: ``python -m compat --broker URL --backend URL``.

One set of Celery behaviours (:mod:`compat.suite.scenarios`) run against a
target system and any number of reference systems, each with its own real
``celery worker`` (:mod:`compat.suite.runner`).
"""

from compat.suite.runner import (
    ERROR,
    FAIL,
    NOT_RUN,
    PASS,
    SKIP,
    Outcome,
    Report,
    System,
    default_backend,
    run_suite,
    system_name,
)
from compat.suite.scenarios import SCENARIOS

__all__ = [
    "ERROR",
    "FAIL",
    "NOT_RUN",
    "PASS",
    "SCENARIOS",
    "SKIP",
    "Outcome",
    "Report",
    "System",
    "default_backend",
    "run_suite",
    "system_name",
]
