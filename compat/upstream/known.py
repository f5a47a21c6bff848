"""pgbroker failures of Celery's and Kombu's suites that are known.

Each entry: the test (as the runner prints it, without ``t.integration.``)
and why it fails. ``intended``: a difference of design, documented in
docs/compatibility.md. ``open``: a bug being fixed elsewhere; remove the
entry once it passes.
"""

from __future__ import annotations

INTENDED: dict[str, str] = {
    "test_inspect.test_Inspect.test_scheduled": (
        "countdown/ETA tasks wait in PostgreSQL, not in a worker: `pgbroker status` "
        "and the message table list them (docs/compatibility.md)"
    ),
}

OPEN: dict[str, str] = {}


def reason(test: str) -> str | None:
    base = test.split("[", 1)[0]
    for table, kind in ((INTENDED, "intended"), (OPEN, "open")):
        why = table.get(test) or table.get(base)
        if why:
            return f"{kind}: {why}"
    return None
