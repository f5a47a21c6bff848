"""The tests themselves: they may share a Redis or RabbitMQ with other users.

A test must never flush a Redis database nor use a queue it did not create
(tests/refbrokers.py gives each test a name and a key prefix of its own).
This test reads the sources of the tests and of compat/ so that a flush
never comes back.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Spelt so that this file itself matches no grep for the two commands.
FLUSH = re.compile(r"flush(db|all)", re.IGNORECASE)


def sources() -> list[Path]:
    return sorted([*(ROOT / "tests").rglob("*.py"), *(ROOT / "compat").rglob("*.py")])


def test_no_test_flushes_a_redis_database() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sources()
        if path != Path(__file__).resolve()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if FLUSH.search(line)
    ]
    assert not found, "a test flushes a Redis database it may share:\n" + "\n".join(found)


def test_reference_broker_urls_come_from_the_environment() -> None:
    """Tests take Redis and RabbitMQ URLs from tests/refbrokers.py, not a
    hard-coded database number on the machine's server."""
    hard_coded = re.compile(r"""["'](redis|amqp)://[^"']*127\.0\.0\.1:(6379|5672)""")
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in (ROOT / "tests").rglob("*.py")
        if path.name not in ("refbrokers.py", Path(__file__).name)
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if hard_coded.search(line)
    ]
    assert not found, "\n".join(found)


def test_reimported_test_apps_register_no_duplicate_task_names() -> None:
    """Tests import an app module afresh for each test (client_app): its
    tasks belong to that app only (shared=False), so a second import, and
    any other app, do not meet the first import's tasks under the same name."""
    import warnings

    import celery.exceptions

    from tests.celery_helpers import client_app

    apps = ["tests.apps.basic", "tests.apps.results_app", "tests.apps.durable_waits_app"]
    with warnings.catch_warnings():
        # Celery 5.7 warns of a duplicate task name; 5.5 and 5.6 do not (the
        # names are compared below all the same).
        duplicate = getattr(celery.exceptions, "DuplicateTaskNameWarning", None)
        if duplicate is not None:
            warnings.simplefilter("error", duplicate)
        names = []
        for module in [*apps, *apps]:
            with client_app(module, "memory://") as mod:
                names.append(sorted(n for n in mod.app.tasks if not n.startswith("celery.")))
    for first, again in zip(names[: len(apps)], names[len(apps) :], strict=True):
        assert first == again
    assert not any(n.startswith("tests.apps.basic") for n in names[1]), names[1]


def test_test_app_tasks_are_not_shared() -> None:
    """A task registered with Celery's default shared=True joins every app
    created afterwards in the process, so one test's app module leaks its
    tasks into the next test's app (seen in CI: DuplicateTaskNameWarning
    under filterwarnings=error, depending on test order). Every task the
    tests declare says shared=False."""
    found = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in sorted((ROOT / "tests").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for decorator in node.decorator_list
        if _is_task_decorator(decorator) and not _says_not_shared(decorator)
    ]
    assert not found, "tasks without shared=False:\n" + "\n".join(found)


def _is_task_decorator(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Attribute) and target.attr == "task"


def _says_not_shared(decorator: ast.expr) -> bool:
    return isinstance(decorator, ast.Call) and any(
        k.arg == "shared" and isinstance(k.value, ast.Constant) and k.value.value is False
        for k in decorator.keywords
    )
