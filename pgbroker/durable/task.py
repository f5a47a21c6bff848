"""The :class:`DurableTask` base class, tying runs, steps and waits together.

A run (``__call__``) takes the task id's lock, returns a stored SUCCESS
without running, takes the ``exclusive_key``, then runs the body, whose
``self.step()``, ``self.wait_for_event()`` and ``self.sleep()`` are
checkpointed; the lock is held until Celery has stored the run's outcome.
:mod:`pgbroker.durable` documents the whole API.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar, cast

import psycopg
from celery import Task
from celery.exceptions import Ignore, Reject
from celery.signals import task_postrun

from pgbroker.durable.config import DurableConfig
from pgbroker.durable.housekeeping import finish
from pgbroker.durable.runs import Run, begin_run, end_run, stored_success, take_exclusive_key
from pgbroker.durable.steps import run_step
from pgbroker.durable.waits import PARKS_HEADER, parks_of, wait_event, wait_sleep
from pgbroker.errors import LeaseLost
from pgbroker.logs import recovery

logger = logging.getLogger("pgbroker.durable")

T = TypeVar("T")


class DurableTask(Task):  # type: ignore[misc]
    """A Celery task whose ``self.step(...)`` calls are checkpointed in
    PostgreSQL (see :mod:`pgbroker.durable`)."""

    #: Seconds to keep a succeeded task's steps; None: the app's
    #: ``pgbroker_durable_keep`` (one day by default).
    durable_keep: float | None = None

    #: At most one running instance per key: a format string over the task's
    #: arguments (``"customer:{customer_id}"``) or a callable taking them.
    exclusive_key: str | Callable[..., str] | None = None
    #: What a run does when another run holds its key: "wait", "skip" or
    #: "retry" (see :mod:`pgbroker.durable`).
    on_conflict: str = "wait"
    #: "wait": longest wait for the key, in seconds (None: no limit).
    exclusive_timeout: float | None = None
    #: "retry": the countdown of the Celery retry, in seconds.
    exclusive_countdown: float = 10.0

    _durable_config: DurableConfig | None = None

    @property
    def durable_config(self) -> DurableConfig:
        if self._durable_config is None:
            self._durable_config = DurableConfig.from_app(self.app)
        return self._durable_config

    # --- a run: exclusive per task id (pgbroker.durable.runs) ------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        task_id = request.id
        if not task_id or request.called_directly:
            return super().__call__(*args, **kwargs)  # a plain function call
        _end_finished_run()  # one whose outcome no tracer reported (see below)
        try:
            run = begin_run(self.durable_config, task_id, self.name)
        except psycopg.OperationalError as exc:
            # No session to hold the run (DatabaseUnavailable, ConnectionLost:
            # a session terminated as it started): nothing ran, so the
            # message goes back to its queue rather than end as a FAILURE.
            if self.acks_late and not request.is_eager:
                logger.warning(
                    "task %s[%s]: no database session to begin the run (%s): requeued",
                    self.name,
                    task_id,
                    exc,
                    extra=recovery("requeue", task_id=task_id, reason=type(exc).__name__),
                )
                raise Reject(exc, requeue=True) from exc
            raise
        try:
            found, value = stored_success(self, task_id)
            if found:
                logger.info(
                    "task %s[%s] already succeeded (result stored): not run again",
                    self.name,
                    task_id,
                    extra=recovery("skip_done", task_id=task_id, reason="result stored"),
                )
                if request.is_eager:
                    return value
                # Another delivery of this task id (a redelivery after its
                # ack was lost, or the original message beside its own retry)
                # finished it: the run that stored SUCCESS sent the chain's
                # next link and counted the chord part. Ignore: Celery acks
                # this message and stores, sends and counts nothing again.
                raise Ignore()
            if self.exclusive_key is not None:
                skipped = take_exclusive_key(self, run, args, kwargs)
                if skipped is not None:
                    return skipped
            request._durable_run = run  # copied into the request the body sees
            try:
                return super().__call__(*args, **kwargs)
            except LeaseLost as exc:
                logger.error(
                    "%s", exc, extra=recovery("lease_lost", task_id=task_id, reason="lease lost")
                )
                if self.acks_late and not request.is_eager:
                    raise Reject(exc, requeue=True) from exc
                raise
        finally:
            request._durable_run = None
            # The lock is released once Celery has stored this run's outcome
            # and handed its chain's next link off (task_postrun, after both):
            # a run of the same task id waiting for it (two messages of one
            # id) then finds the SUCCESS stored and runs nothing. Released as
            # the body returned, the waiting run could start before the
            # SUCCESS was stored, and both handed the next link off.
            _finished.run = run

    # --- retries: parks do not count (pgbroker.durable.waits) ------------------------

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Any:
        """Celery's ``retry``, except that the task's parks (durable waits,
        which are retries too) do not count against ``max_retries``."""
        parks = parks_of(self)
        if not parks:
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        limit = self.max_retries if max_retries is None else max_retries
        headers = {**(self.request.headers or {}), **(options.pop("headers", None) or {})}
        options["headers"] = {**headers, PARKS_HEADER: parks}
        had_override = "override_max_retries" in self.__dict__
        try:
            return super().retry(
                args,
                kwargs,
                exc,
                throw,
                eta,
                countdown,
                None if limit is None else limit + parks,
                **options,
            )
        finally:
            # Celery keeps the limit given to retry() on the task object for
            # autoretry; ours includes this request's parks, so drop it.
            if not had_override:
                self.__dict__.pop("override_max_retries", None)

    # --- durable waits (pgbroker.durable.waits) --------------------------------------

    def wait_for_event(self, name: str, timeout: float | timedelta | None = None) -> Any:
        """The payload of event ``name`` (see :func:`send_event`), waiting up
        to ``timeout`` seconds (None: no limit) without holding a worker;
        :class:`EventTimeout` when it does not come in time."""
        return wait_event(self, name, timeout)

    def sleep(self, name: str, seconds: float | timedelta) -> None:
        """Sleep ``seconds`` without holding a worker: the run parks and the
        task resumes when the time is up. Recorded like a step named
        ``name``, so a replay does not sleep again."""
        wait_sleep(self, name, seconds)

    # --- steps (pgbroker.durable.steps) ----------------------------------------------

    def step(
        self,
        name: str,
        fn: Callable[..., T],
        *args: Any,
        conn: psycopg.Connection | None = None,
        retries: int = 0,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
        **kwargs: Any,
    ) -> T:
        """Run ``fn(*args, **kwargs)`` once for this task id; return its
        output, recorded (see :mod:`pgbroker.durable`)."""
        # A replayed step returns its recorded output, decoded from the
        # task's serializer: the T that fn returned, as that serializer
        # round-trips it (a tuple comes back a list under JSON).
        return cast(
            T,
            run_step(
                self,
                name,
                fn,
                args,
                kwargs,
                conn=conn,
                retries=retries,
                backoff=backoff,
                max_backoff=max_backoff,
                retry_on=retry_on,
            ),
        )

    # --- when the task succeeds (pgbroker.durable.housekeeping) ----------------------

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        """Mark the task's steps for pruning after ``keep`` seconds.

        Subclasses overriding ``on_success`` must call ``super().on_success``.
        """
        super().on_success(retval, task_id, args, kwargs)
        try:
            finish(self, task_id)
        except Exception as exc:  # the task succeeded; this is housekeeping
            logger.warning(
                "task %s[%s]: could not mark its steps done: %s", self.name, task_id, exc
            )


#: The run whose body returned in this thread, until Celery's tracer
#: reports its outcome stored (task_postrun): its lock is held until then.
_finished = threading.local()


def _end_finished_run(task_id: str | None = None) -> None:
    """End the run kept in ``_finished`` (if ``task_id`` is given: only the
    run of that task id)."""
    run: Run | None = getattr(_finished, "run", None)
    if run is not None and (task_id is None or run.task_id == task_id):
        _finished.run = None
        end_run(run)


def _on_task_postrun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    if task_id is not None:
        _end_finished_run(task_id)


task_postrun.connect(_on_task_postrun, weak=False)
