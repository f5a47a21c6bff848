"""Celery's and Kombu's own integration suites on pgbroker (slow: ``-m upstream``).

Runs ``python -m compat.upstream --systems pgbroker --check``: Celery 5.7's
``t/integration`` modules named by ``PGBROKER_UPSTREAM_MODULES`` (default
``canvas,tasks``, what fits CI's time) and Kombu's ``t/integration/common.py``
base classes, against a database the runner creates and drops. Fails when
a test fails on pgbroker that ``compat/upstream/known.py`` does not list.
Not part of the default run (``addopts`` deselects the marker); CI runs it
after the default suite:

    .venv/bin/python -m pytest -m upstream -n 0 -s tests/test_upstream.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.upstream


@pytest.mark.timeout(2400)
def test_celery_and_kombu_suites_on_pgbroker(pg_admin_url: str, tmp_path: Path) -> None:
    pytest.importorskip("pytest_rerunfailures", reason="pip install -e '.[upstream]'")
    modules = os.environ.get("PGBROKER_UPSTREAM_MODULES", "canvas,tasks")
    cmd = [
        sys.executable, "-m", "compat.upstream", "--systems", "pgbroker", "--celery", modules,
        "--check", "--out", str(tmp_path / "run"), "--pg-admin-url", pg_admin_url,
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, timeout=2300)
    assert result.returncode == 0, "a Celery or Kombu integration test fails on pgbroker (above)"
