"""pgbroker failures of Celery's and Kombu's suites that are known.

Each entry: the test (as the runner prints it, without ``t.integration.``;
parameters may be left off) and why it fails. ``INTENDED``: a difference of
design, documented in docs/compatibility.md. ``ALSO_ON_REDIS``: fails on the
Redis reference too (a Celery bug, or a test that races on this machine).
``OPEN``: a pgbroker bug not fixed yet; remove the entry once the test
passes. ``NOT_RUN``:
Celery modules that ``--celery all`` leaves out, with the reason.
"""

from __future__ import annotations

_ETA = (
    "countdown/ETA tasks wait in PostgreSQL, not in a worker: `pgbroker status` counts them, "
    "`pgbroker tasks show ID` and SQL list them (docs/compatibility.md)"
)

INTENDED: dict[str, str] = {
    "test_inspect.test_Inspect.test_scheduled": _ETA,
    "test_canvas.test_chord.test_group_or_task_countdown_delays_header": (
        "a delayed message is handed to the worker without its eta header once due "
        "(docs/delivery.md), so request.eta is None in the task; the delay itself holds"
    ),
    "test_canvas.test_chain.test_chord_header_id_duplicated_on_rabbitmq_msg_duplication": (
        "the test republishes a task message to simulate a broker duplicate; pgbroker's "
        "publish deduplication stores it once (docs/delivery.md), so the chain runs once"
    ),
}

ALSO_ON_REDIS: dict[str, str] = {
    "test_tasks.test_trace_log_arguments.test_task_success": (
        "fails on Redis too here: the worker's log records are not yet in caplog when "
        "the test reads them 10 ms after result.get()"
    ),
    "test_tasks.test_trace_log_arguments.test_task_failed": (
        "fails on Redis too here (as test_task_success)"
    ),
    "test_canvas.test_chord.test_error_propagates_from_chord": (
        "fails on Redis too: Celery marks it xfail there (Celery issue #6437, a failure "
        "before a group at the end of a chain does not reach the group's results); the "
        "mark names Redis only, so on pgbroker it runs and times out the same way"
    ),
}

OPEN: dict[str, str] = {}

NOT_RUN: dict[str, str] = {
    "backend": (
        "Azure Blob Storage result backend only: needs azure-storage-blob to import and "
        "AZUREBLOCKBLOB_URL to run (skipped by the suite without it)"
    ),
}


def reason(test: str) -> str | None:
    base = test.split("[", 1)[0]
    tables = ((INTENDED, "intended"), (ALSO_ON_REDIS, "also on Redis"), (OPEN, "open"))
    for table, kind in tables:
        why = table.get(test) or table.get(base)
        if why:
            return f"{kind}: {why}"
    return None
