"""pgbroker failures of Celery's and Kombu's suites that are known.

Each entry: the test (as the runner prints it, without ``t.integration.``;
parameters may be left off) and why it fails. ``INTENDED``: a difference of
design, documented in docs/compatibility.md. ``OPEN``: a bug or a test
problem not fixed yet; remove the entry once the test passes. ``NOT_RUN``:
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

# Task.replace() publishes the replacement under the replaced task's id, which
# pgbroker's publish deduplication drops: the workflow never finishes.
_REPLACE = "Task.replace: the replacement reuses the task id and is deduplicated (being fixed)"
_REPLACE_TESTS = [
    "test_canvas.test_chain.test_complex_chain",
    "test_canvas.test_chain.test_replace_with_chain_that_contains_a_group",
    "test_canvas.test_chain.test_chain_child_replaced_with_chain_first",
    "test_canvas.test_chain.test_chain_child_replaced_with_chain_middle",
    "test_canvas.test_group.test_task_replace_with_group_preserves_group_order",
    "test_canvas.test_chord.test_replaced_nested_chord",
    "test_canvas.test_chord.test_group_chain",
    "test_canvas.test_chord.test_group_kwargs",
    "test_canvas.test_chord.test_group_args_and_kwargs",
    "test_canvas.test_chord.test_single_task_header",
    "test_canvas.test_chord.test_empty_header_chord",
    "test_canvas.test_chord.test_nested_chord",
    "test_canvas.test_chord.test_chord_header_task_replaced_with_chain",
    "test_canvas.test_chord.test_chord_header_child_replaced_with_chain_first",
    "test_canvas.test_chord.test_chord_header_child_replaced_with_chain_middle",
    "test_canvas.test_chord.test_chord_header_child_replaced_with_chain_last",
    "test_canvas.test_chord.test_chord_body_task_replaced_with_chain",
    "test_canvas.test_chord.test_chord_body_chain_child_replaced_with_chain_first",
    "test_canvas.test_chord.test_chord_body_chain_child_replaced_with_chain_middle",
    "test_canvas.test_chord.test_chord_body_chain_child_replaced_with_chain_last",
    "test_tasks.test_task_replacement.test_replaced_task_nesting_increments",
    "test_tasks.test_task_replacement.test_replaced_task_nesting_level_0",
]

OPEN: dict[str, str] = {
    **dict.fromkeys(_REPLACE_TESTS, _REPLACE),
    "test_tasks.test_trace_log_arguments.test_task_success": (
        "fails on Redis too here: the worker's log records are not yet in caplog when "
        "the test reads them 10 ms after result.get()"
    ),
    "test_tasks.test_trace_log_arguments.test_task_failed": (
        "fails on Redis too here (as test_task_success)"
    ),
    "test_canvas.test_chord.test_error_propagates_from_chord": (
        "not triaged: res.get() times out or raises ChordError('Dependency ... raised "
        "ExpectedException') where Redis raises ExpectedException"
    ),
    "test_canvas.test_chord.test_error_propagates_to_chord_from_simple": (
        "not triaged: the error of a simple header task reaches the chord differently "
        "than on Redis"
    ),
    "test_upstream_kombu.test_Failover.test_failover_switches_to_alternate_url": (
        "Kombu failover URLs: connecting past a dead first pgbroker URL (being fixed)"
    ),
}

NOT_RUN: dict[str, str] = {
    "backend": (
        "Azure Blob Storage result backend only: needs azure-storage-blob to import and "
        "AZUREBLOCKBLOB_URL to run (skipped by the suite without it)"
    ),
}


def reason(test: str) -> str | None:
    base = test.split("[", 1)[0]
    for table, kind in ((INTENDED, "intended"), (OPEN, "open")):
        why = table.get(test) or table.get(base)
        if why:
            return f"{kind}: {why}"
    return None
