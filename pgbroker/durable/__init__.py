"""Durable execution: steps, exclusive runs, waits and events in a Celery task.

A task built on :class:`DurableTask` runs its side effects through
``self.step(name, fn, *args)``. Each step's output is recorded in
PostgreSQL under (task id, step index) as soon as the step returns; when the
same task id runs again (a Celery retry, or a redelivery after the worker
died), the steps that already completed return their recorded output
without running, and the task carries on from the first step that did not::

    from pgbroker.durable import DurableTask

    @app.task(bind=True, base=DurableTask, acks_late=True)
    def onboard(self, user_id):
        account = self.step("create_account", create_account, user_id)
        self.step("charge", charge_card, account)          # not charged twice
        self.step("welcome_email", send_welcome, account)

Use ``acks_late=True`` (so a task whose worker died is delivered again) and
``task_reject_on_worker_lost=True`` (so does one whose pool process was
killed, e.g. by the OOM killer).

What is guaranteed (docs/durability.md has the full list)
    A step whose checkpoint was committed never runs again for that task id.
    A step run without ``conn=`` is *at least once*: if the process dies
    after the function returned but before its checkpoint was committed, the
    step runs again (give external calls an idempotency key, e.g.
    ``f"{self.request.id}:charge"``). A step run with ``conn=`` is *exactly
    once* for its database work: the work and the checkpoint commit in one
    transaction, and of two runs racing on one task id, only the first to
    commit keeps its work (the other's is rolled back and it gets the first
    one's output).

One run per task id
    A run holds a PostgreSQL advisory lock keyed on its task id, on a pooled
    connection of its own (not the broker's session), from before the body
    starts until it ends. A second run of the same id (a redelivery after
    the broker took the message from a consumer it thought dead) waits for
    the first to end, then replays. Checkpoints are fenced: written on the
    lock's connection, or (``conn=``) in a transaction that share-locks the
    run's ``durable_run`` row and checks its run id; a run whose lock
    session was lost gets :class:`LeaseLost` instead of recording (and, with
    ``acks_late``, its message goes back to the queue). When pgbroker is the
    result backend and it holds SUCCESS for the task id, a new run returns
    the stored result without running the body.

Exclusive keys
    ``@app.task(base=DurableTask, exclusive_key="customer:{customer_id}",
    on_conflict="wait")``: at most one running instance per key (a format
    string over the task's arguments, or a callable taking them). With
    ``"wait"`` the second run waits (up to ``exclusive_timeout`` seconds, then
    :class:`ExclusiveKeyBusy`); with ``"skip"`` it returns ``{"skipped":
    True, "exclusive_key": key, "held_by": task_id}`` without running; with
    ``"retry"`` it asks for a Celery retry in ``exclusive_countdown`` seconds
    (counted against ``max_retries``).

Durable waits
    ``self.wait_for_event(name, timeout=None)`` returns the payload of
    :func:`send_event` ``(app_or_url, name, payload)``; ``self.sleep(name,
    seconds)`` sleeps. A wait that cannot return at once parks: it records
    itself in ``durable_wait`` and ends the run with a Celery retry due at
    the deadline (a delayed message in pgbroker), not counted against
    ``max_retries``, so it holds no worker. ``send_event`` makes the
    waiters' messages ready at once. A timed-out wait raises
    :class:`EventTimeout`. Waits are recorded like steps, so replays are
    deterministic.

Steps

``self.step(name, fn, *args, conn=None, retries=0, backoff=1.0,
max_backoff=60.0, retry_on=(Exception,), **kwargs)`` calls
``fn(*args, **kwargs)``.

* Steps are numbered in call order, from 0. Task code must call the same
  steps in the same order on every run (branch on step outputs, not on the
  clock or random numbers outside steps); a run that reaches a recorded
  index with another step name raises :class:`NonDeterministicWorkflow`.
* ``conn``: a psycopg 3 connection to the database holding pgbroker's
  schema. The function runs and the checkpoint is written in one
  transaction on it: on an autocommit connection, committed when the step
  returns; otherwise a savepoint in the caller's transaction, so both
  commit when the caller commits (``with psycopg.connect(url) as conn:``
  commits at the end of the block) or neither does. Without ``conn``, the
  checkpoint is written through a small per-process connection pool.
* ``retries``, ``backoff``, ``max_backoff``, ``retry_on``: an exception in
  ``retry_on`` runs the function again in this process, up to ``retries``
  more times, after ``backoff * 2**n`` seconds (at most ``max_backoff``).
  With ``conn``, each attempt is its own (sub)transaction, so a failed
  attempt's work is rolled back. Celery's control exceptions (``Retry``,
  ``Ignore``, ``Reject``, ``SoftTimeLimitExceeded``) are never retried. The
  number of attempts and the last error are recorded; a step whose attempts
  all failed is recorded as 'failed' and its exception propagates (so
  Celery's own retry, ``autoretry_for``, applies to the task as usual).

Outputs

Outputs are encoded with the app's ``result_serializer`` (json by default)
and a step returns the *decoded* value on its first run as on a replay, so
both behave the same. With json (Kombu's), dicts, lists, strings, numbers,
booleans, None, bytes, datetimes, UUIDs and Decimals round-trip; tuples come
back as lists and dict keys as strings; sets and other objects are refused
with :class:`StepOutputError` (or use ``result_serializer = "pickle"``, with
pickle in ``accept_content``). Outputs are stored in a bytea column: keep
them small (ids, not documents).

Configuration (Celery settings)

``pgbroker_durable_url``
    The database of the step records. Default: ``broker_url`` if it is a
    pgbroker URL (postgresql://, postgres://, pgbroker://), else
    ``result_backend`` if it is one.
``pgbroker_durable_schema``
    Default: the ``schema`` of ``broker_transport_options`` when the broker
    is pgbroker, else of ``result_backend_transport_options`` when the
    result backend is, else ``pgbroker``. Its ``auto_migrate`` option is
    followed too: the schema is created or upgraded on first use.
``pgbroker_durable_keep`` (``86400``)
    Seconds a succeeded task's steps are kept (to inspect them, and so that
    a crash between success and the message's ack replays instead of
    re-running). ``0`` deletes them when the task succeeds. A task class
    attribute ``durable_keep`` overrides it per task:
    ``@app.task(base=DurableTask, durable_keep=3600)``.
``pgbroker_durable_prune_interval`` (``60``)
    Each worker process deletes expired steps (one batch) after a task
    succeeds, at most this often; ``0`` leaves pruning to :func:`prune`.

Steps of failed tasks are kept (sending the same task id again resumes
it) until :func:`prune` removes tasks idle for longer than a given age.
Rows live in ``<schema>.durable_step`` (``migrations/003_durable_steps.sql``)::

    SELECT task_id, step_index, name, attempts, error
    FROM pgbroker.durable_step WHERE state = 'failed';

Limitations: ``Task.replace()`` keeps the task id, so a durable task must
not be replaced by another durable task. Steps do not nest.

Errors
    :class:`NonDeterministicWorkflow`, :class:`StepOutputError`,
    :class:`LeaseLost`, :class:`EventTimeout`, :class:`ExclusiveKeyBusy` and
    :class:`DurableWaitError` are in :mod:`pgbroker.errors` (subclasses of
    :class:`~pgbroker.errors.PgBrokerError`); ``EventTimeout``, the one a task
    catches, is exported here too.

Modules
    ``task`` (:class:`DurableTask`, tying the others together), ``runs`` (a
    run's lock and fencing, exclusive keys), ``steps`` (recording and
    replaying steps, their outputs, :func:`recorded_steps`), ``waits``
    (durable waits, :func:`send_event`, :func:`waiting`), ``housekeeping``
    (keeping and pruning records, :func:`prune`) and ``config`` (the
    settings and this process's connections).
"""

from __future__ import annotations

from pgbroker.durable.housekeeping import prune
from pgbroker.durable.steps import recorded_steps
from pgbroker.durable.task import DurableTask
from pgbroker.durable.waits import SentEvent, send_event, waiting
from pgbroker.errors import (
    DurableWaitError,
    EventTimeout,
    ExclusiveKeyBusy,
    LeaseLost,
    NonDeterministicWorkflow,
    StepOutputError,
)

# The durable errors are defined in pgbroker.errors and raised by durable
# tasks: users catch them from here, and results stored before they moved
# name this module (Celery's exc_module) and still find them.
__all__ = [
    "DurableTask",
    "DurableWaitError",
    "EventTimeout",
    "ExclusiveKeyBusy",
    "LeaseLost",
    "NonDeterministicWorkflow",
    "SentEvent",
    "StepOutputError",
    "prune",
    "recorded_steps",
    "send_event",
    "waiting",
]
