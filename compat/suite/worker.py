"""One real ``celery worker`` process per system, started the same way for all.

The worker runs in its own session (process group), so stopping it kills its
prefork children too. Its output goes to a log file, never a pipe that could
fill up. URLs reach it through the environment, not its command line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from celery import Celery

#: The package root (the directory holding ``compat/``), for the worker's path.
ROOT = Path(__file__).resolve().parent.parent.parent
APP = "compat.apps.worker"
#: The worker settings, identical for every system: only the node name and
#: the (per-run) queue names differ.
WORKER_ARGS = ("worker", "--pool=prefork", "--concurrency=2", "--loglevel=INFO")


def worker_command(nodename: str, queues: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        APP,
        *WORKER_ARGS,
        "-n",
        nodename,
        "-Q",
        ",".join(queues),
    ]


def nodename_for(system: str, namespace: str) -> str:
    # Spelled out in full (no %h), so control commands can name it.
    return f"compat-{system}-{namespace}@{socket.gethostname()}"


class WorkerProcess:
    def __init__(
        self,
        nodename: str,
        queues: list[str],
        env: dict[str, str],
        log_path: Path,
    ) -> None:
        self.nodename = nodename
        self.queues = queues
        self.log_path = log_path
        full_env = dict(os.environ)
        full_env.update(env)
        full_env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
        )
        full_env["PYTHONUNBUFFERED"] = "1"
        # Celery refuses to run as root with pickle accepted unless told.
        full_env["C_FORCE_ROOT"] = "1"
        self._env = full_env
        self._log: IO[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            worker_command(self.nodename, self.queues),
            env=self._env,
            cwd=self.log_path.parent,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, app: Celery, timeout: float = 60.0) -> None:
        """Until the worker answers a ping (so its pidbox consumer is up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"worker exited with code {self.returncode()} while starting: "
                    f"{_last_line(self.log_tail())}"
                )
            # Ping only once the worker says it is ready: a ping published
            # before its pidbox queue exists would match no queue.
            if " ready." in self.log_tail(200) and self.ping(app, timeout=1.0):
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"worker did not answer a ping within {timeout:.0f} s: {_last_line(self.log_tail())}"
        )

    def ping(self, app: Celery, timeout: float) -> bool:
        replies: Any = app.control.ping(destination=[self.nodename], timeout=timeout)
        return any(self.nodename in reply for reply in replies or [])

    def stop(self, timeout: float = 15.0) -> None:
        """Warm shutdown (SIGTERM); SIGKILL the whole group if it lingers."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout)
        finally:
            # The pool children, even when the main process already exited.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            if self._log is not None:
                self._log.close()


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip()[:200] if lines else "(no output)"
