"""What a scenario works with: the client app, the worker's name, bounded waits.

Scenarios check with :meth:`Context.check` (not ``assert``, which ``python -O``
removes) and wait only through the helpers here, each with a timeout, so a
broker that loses a message fails the scenario instead of hanging the suite.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from compat.apps.suite_app import Names

T = TypeVar("T")


class ScenarioFailure(AssertionError):
    """The system did not behave as the scenario expects."""


class Skip(Exception):
    """The scenario does not apply to this system."""


@dataclass
class Context:
    app: Celery
    names: Names
    nodename: str
    state_dir: Path
    driver_type: str
    backend_name: str
    #: What the scenario is doing, named in the report when it raises.
    current_step: str = ""

    def step(self, text: str) -> None:
        self.current_step = text

    def task(self, name: str) -> Any:
        return self.app.tasks[f"compat.{name}"]

    def path(self, name: str) -> str:
        """A fresh file path shared with the worker (nothing is created)."""
        return str(self.state_dir / f"{name}-{uuid.uuid4().hex[:8]}")

    @staticmethod
    def check(condition: object, message: str) -> None:
        if not condition:
            raise ScenarioFailure(message)

    def equal(self, actual: object, expected: object, what: str) -> None:
        self.check(actual == expected, f"{what}: got {_short(actual)}, expected {_short(expected)}")

    def get(self, result: Any, timeout: float = 20.0, what: str | None = None) -> Any:
        """The result of a task expected to succeed."""
        what = what or _describe(result)
        try:
            return result.get(timeout=timeout, disable_sync_subtasks=False)
        except CeleryTimeoutError:
            raise ScenarioFailure(
                f"{what}: no result within {timeout:.0f} s (state {_state(result)})"
            ) from None
        except Exception as exc:
            raise ScenarioFailure(f"{what} failed: {type(exc).__name__}: {exc}") from None

    def get_error(self, result: Any, timeout: float = 20.0, what: str | None = None) -> Any:
        """The exception of a task expected to fail (or be revoked)."""
        what = what or _describe(result)
        try:
            value = result.get(timeout=timeout, propagate=False, disable_sync_subtasks=False)
        except CeleryTimeoutError:
            raise ScenarioFailure(
                f"{what}: no result within {timeout:.0f} s (state {_state(result)})"
            ) from None
        if not isinstance(value, BaseException):
            raise ScenarioFailure(f"{what} returned {_short(value)}, expected an error")
        return value

    def wait_until(
        self, predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05
    ) -> T:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise ScenarioFailure(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(interval)

    def wait_file(self, path: str, timeout: float, what: str) -> str:
        def read() -> str | None:
            try:
                return Path(path).read_text()
            except FileNotFoundError:
                return None

        return self.wait_until(read, timeout, what)

    def inspect(self, timeout: float = 5.0) -> Any:
        return self.app.control.inspect(destination=[self.nodename], timeout=timeout)

    def control(self, command: str, timeout: float = 5.0, **arguments: Any) -> Any:
        """Send a control command to our worker only; return its reply."""
        replies = self.app.control.broadcast(
            command,
            arguments=arguments,
            destination=[self.nodename],
            reply=True,
            timeout=timeout,
        )
        for reply in replies or []:
            if self.nodename in reply:
                return reply[self.nodename]
        raise ScenarioFailure(f"no reply to control command {command!r} within {timeout:.0f} s")

    def add_consumer(self, queue: str) -> None:
        reply = self.control("add_consumer", queue=queue)
        self.check("ok" in reply, f"add_consumer {queue}: {reply}")

    def settle(self, timeout: float = 20.0) -> None:
        """Wait (bounded, best effort) until the worker has nothing in hand."""
        inspect = self.inspect(timeout=2.0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                busy = [
                    (method() or {}).get(self.nodename)
                    for method in (inspect.active, inspect.reserved, inspect.scheduled)
                ]
            except Exception:
                return
            if not any(busy):
                return
            time.sleep(0.5)


def _describe(result: Any) -> str:
    # Not result.name: with result_extended it is one more backend query.
    return f"{type(result).__name__}[{str(getattr(result, 'id', ''))[:8]}]"


def _state(result: Any) -> str:
    if isinstance(result, AsyncResult):
        try:
            return str(result.state)
        except Exception as exc:
            return f"unknown: {type(exc).__name__}"
    return "n/a"


def _short(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"
