"""The compatibility suite (``python -m compat``).

``test_suite_on_pgbroker`` runs every scenario against pgbroker (broker and
result backend in a fresh database) and requires every one to pass. When
Redis and RabbitMQ answer, the same scenarios run against them as references
and their table is printed: a reference failure is only reported, but an
error of the harness itself fails the test. The other tests cover the CLI and
the ``--app`` smoke check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import celery
import kombu
import pytest
from celery import Celery
from kombu import Queue
from kombu.exceptions import OperationalError

from compat.suite import ERROR, PASS, SCENARIOS, System, run_suite
from compat.suite.appcheck import FAIL, OK, WARN, check_app, sample_arguments
from compat.suite.runner import Outcome, Report, SystemRun, classify, render_table
from tests.refbrokers import AMQP_URL, REDIS_URL, answers

ROOT = Path(__file__).resolve().parent.parent


#: Scenarios whose behaviour came with a newer Celery or Kombu than the one
#: installed: they fail on Redis and RabbitMQ too, and are not required.
OLDER_LIBRARY = {
    # Celery 5.6: revoke marks a reserved task REVOKED at once (5.5: when
    # the worker would have run it).
    **({"revoke": "Celery < 5.6"} if celery.VERSION[:2] < (5, 6) else {}),
    # Kombu 5.7: a rate limit's TokenBucket no longer counts the time it sat
    # full as refill time (5.5, 5.6: the second task starts at once).
    **({"rate_limit": "Kombu < 5.7"} if kombu.VERSION[:2] < (5, 7) else {}),
}


def references() -> list[System]:
    # The suite names every queue and exchange after a fresh namespace and
    # deletes them at the end: the references may be shared servers.
    refs = []
    redis = answers(REDIS_URL)
    if redis:
        refs.append(System("redis", REDIS_URL, REDIS_URL))
    if answers(AMQP_URL):
        refs.append(System("rabbitmq", AMQP_URL, REDIS_URL if redis else "rpc://"))
    return refs


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_suite_on_pgbroker(db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = run_suite(
        System("pgbroker", db_url, db_url),
        references(),
        log_dir=tmp_path / "logs",
        progress=print,
    )
    with capsys.disabled():
        print("\n" + report.table())
    assert not report.harness_errors(), "\n".join(report.harness_errors())
    assert set(report.target.outcomes) == set(SCENARIOS)
    failed = {
        n: o.detail
        for n, o in report.target.outcomes.items()
        if o.status != PASS and n not in OLDER_LIBRARY
    }
    assert not failed, f"scenarios not passing on pgbroker: {failed}\n{report.table()}"
    for run in report.references:
        # Every scenario ran and got a verdict, whatever it was.
        assert set(run.outcomes) == set(SCENARIOS), run.system.name
        assert all(o.status != ERROR for o in run.outcomes.values())


def test_cli_runs_and_writes_json(db_url: str, tmp_path: Path) -> None:
    app_module = tmp_path / "user_app.py"
    app_module.write_text(
        textwrap.dedent(
            """
            from celery import Celery

            app = Celery("user_app", broker="memory://")
            app.conf.task_routes = {"user_app.report": {"queue": "reports"}}

            @app.task(shared=False, name="user_app.report")
            def report(day: str, limit: int) -> int:
                return limit
            """
        )
    )
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "compat",
            "--backend",
            db_url,
            "--only",
            "basic,chord",
            "--app",
            "user_app:app",
            "--json",
            str(out),
        ],
        # The broker comes from the environment, so the URL is not in `ps`.
        env={**_env(), "COMPAT_BROKER_URL": db_url},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| basic     | pass     |" in proc.stdout, proc.stdout
    assert "| user_app.report | reports |" in proc.stdout, proc.stdout
    data = json.loads(out.read_text())
    [system] = data["systems"]
    assert system["name"] == "pgbroker" and system["role"] == "target"
    assert {k: v["status"] for k, v in system["outcomes"].items()} == {
        "basic": "pass",
        "chord": "pass",
    }
    [task] = data["app_check"]["tasks"]
    assert (task["task"], task["queue"], task["status"]) == ("user_app.report", "reports", OK)


def test_cli_exit_status_when_the_app_check_fails(db_url: str, tmp_path: Path) -> None:
    (tmp_path / "bad_app.py").write_text(
        textwrap.dedent(
            """
            from celery import Celery

            app = Celery("bad_app", broker="memory://")
            app.conf.accept_content = ["json"]

            @app.task(shared=False, name="bad_app.pickled", serializer="pickle")
            def pickled(x):
                return x
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "compat", "--broker", db_url, "--only", "basic", "--app", "bad_app"],
        env=_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # The scenario passed: the exit status is the app check's.
    assert "| basic     | pass     |" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL: ContentDisallowed" in proc.stdout, proc.stdout


def test_cli_usage_errors() -> None:
    for argv in (["--only", "basic"], ["--broker", "redis://", "--only", "no_such_scenario"]):
        proc = subprocess.run(
            [sys.executable, "-m", "compat", *argv],
            env={k: v for k, v in _env().items() if k != "COMPAT_BROKER_URL"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, proc.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "compat", "--list"], env=_env(), capture_output=True, text=True
    )
    assert listed.stdout.split() == list(SCENARIOS)


#: Runs ``python -m compat`` with the redis client made impossible to import,
#: as on a machine where it is not installed.
WITHOUT_REDIS = """
import importlib.abc, runpy, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "redis" or name.startswith("redis."):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, Blocker())
for name in [n for n in sys.modules if n == "redis" or n.startswith("redis.")]:
    del sys.modules[name]
sys.argv = ["compat", *sys.argv[1:]]
runpy.run_module("compat", run_name="__main__", alter_sys=True)
"""


def test_cli_missing_client_and_unreachable_reference_are_not_run(db_url: str) -> None:
    """A reference whose client is not installed, or whose broker does not
    answer, is "not run" with the reason, not a column of FAILs; the target
    passed, so the exit status is 0."""
    args = [
        "--only", "basic,chord",
        "--reference-broker", "amqp://guest:s3cret@127.0.0.1:1//",
        "--reference-backend", "rpc://",
        "--reference-broker", REDIS_URL,
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_REDIS, *args],
        env={**_env(), "COMPAT_BROKER_URL": db_url},
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "| basic     | pass     | not run [1] | not run [2] |" in out, out
    assert "| chord     | pass     | not run [1] | not run [2] |" in out, out
    assert "FAIL" not in out, out
    assert "[1] rabbitmq: not run (not reachable at amqp://guest:**@127.0.0.1:1//" in out, out
    assert "[2] redis: not run (the redis client is not installed: pip install redis)" in out, out
    assert "s3cret" not in out + proc.stderr


def test_cli_exit_status_when_the_target_is_not_reachable() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "compat", "--only", "basic"],
        env={**_env(), "COMPAT_BROKER_URL": "postgresql://postgres:s3cret@127.0.0.1:1/none"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "| basic     | not run [1] |" in proc.stdout, proc.stdout
    assert "not reachable at postgresql://postgres:**@127.0.0.1:1/none" in proc.stdout
    assert "s3cret" not in proc.stdout + proc.stderr


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_app_check_routes_serialises_and_flags_problems() -> None:
    app = Celery("user", broker="memory://", set_as_current=False)
    # "sms" has no routing key: Celery gives it the default one, the same
    # binding as "default", so both queues get the messages of both.
    app.conf.task_queues = [Queue("default"), Queue("mail", routing_key="mail"), Queue("sms")]
    app.conf.task_default_queue = "default"
    app.conf.task_routes = {
        "user.send": {"queue": "mail"},
        "user.orphan": {"queue": "nowhere"},
        "user.text": {"queue": "sms"},
    }
    app.conf.accept_content = ["json"]

    @app.task(shared=False, name="user.send")
    def send(to: str, *, retries: int) -> None: ...

    @app.task(shared=False, name="user.plain")
    def plain() -> None: ...

    @app.task(shared=False, name="user.text")
    def text() -> None: ...

    @app.task(shared=False, name="user.orphan")
    def orphan() -> None: ...

    @app.task(shared=False, name="user.pickled", serializer="pickle")
    def pickled() -> None: ...

    checks = {c.task: c for c in check_app(app)}
    # Shared tasks of apps other tests built in this process are the app's
    # too (Celery adds @shared_task tasks to every app); ours are there.
    assert {"user.send", "user.plain", "user.text", "user.orphan", "user.pickled"} <= set(checks)
    assert not any(name.startswith("celery.") for name in checks)
    assert (checks["user.send"].queue, checks["user.send"].status) == ("mail", OK)
    assert checks["user.send"].routing_key == "mail"
    assert checks["user.send"].size > 0
    assert (checks["user.text"].queue, checks["user.text"].status) == ("sms", WARN)
    assert checks["user.text"].routing_key == "default"
    assert "['sms', 'default']" in checks["user.text"].detail
    assert (checks["user.plain"].queue, checks["user.plain"].status) == ("default", WARN)
    assert checks["user.orphan"].status == WARN and "-Q nowhere" in checks["user.orphan"].detail
    assert checks["user.pickled"].status == FAIL
    assert "ContentDisallowed" in checks["user.pickled"].detail
    assert sample_arguments(app.tasks["user.send"]) == (["text"], {"retries": 1})


def test_classify_and_table() -> None:
    assert classify(AssertionError("x")) == "fail"
    assert classify(TimeoutError()) == "fail"
    assert classify(ConnectionRefusedError()) == "fail"
    assert classify(TypeError("harness bug")) == ERROR
    assert classify(OperationalError("broker down")) == "fail"

    target = SystemRun(System("pgbroker", "postgresql://u:secret@h/db", "postgresql://h/db"))
    target.outcomes = {"basic": Outcome("pass"), "chord": Outcome("fail", "ChordError: x\nmore")}
    ref = SystemRun(System("redis", "redis://h/1", "redis://h/1"))
    ref.outcomes = {"basic": Outcome("skip", "n/a")}
    report = Report(["basic", "chord"], target, [ref], "celery worker")
    table = render_table(report)
    assert "| basic     | pass     | skip [1] |" in table
    assert "| chord     | FAIL [2] | -        |" in table
    assert "[2] pgbroker chord: ChordError: x" in table and "more" not in table
    assert not report.target_ok()
    assert "secret" not in json.dumps(report.to_json())
