"""The .pth file that registers the URL schemes runs in every Python process
of the environment: it must cost (next to) nothing there, and still make
``postgresql://`` resolve in Kombu and Celery without ``import pgbroker``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path

import pytest

RUNS = 21
#: The issue's bound: at most 1.5 times the start-up of a bare interpreter.
MAX_RATIO = 1.5


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _start_up(python: str) -> float:
    started = time.perf_counter()
    subprocess.run([python, "-c", "pass"], check=True, env=_env())
    return time.perf_counter() - started


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return env


def test_pth_file_is_installed() -> None:
    assert (_site_packages() / "pgbroker-autoload.pth").exists()


def test_start_up_imports_nothing_heavy() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; print(' '.join(m for m in ('kombu', 'celery', 'psycopg', 'typing', "
            "'importlib.abc', 'pgbroker') if m in sys.modules))",
        ],
        check=True,
        capture_output=True,
        text=True,
        env=_env(),
    ).stdout.split()
    assert out == ["pgbroker"], out  # the .pth ran, and imported nothing else


def test_start_up_costs_at_most_half_again_a_bare_venv(tmp_path: Path) -> None:
    """``python -c pass`` in this environment (pgbroker installed, its .pth
    processed) against the same interpreter in a new venv without any
    package: medians of interleaved runs."""
    venv.create(tmp_path / "bare", with_pip=False)
    bare = str(tmp_path / "bare" / "bin" / "python")
    ours, base = [], []
    for _ in range(3):  # warm the page cache and the .pyc files
        _start_up(sys.executable), _start_up(bare)
    for _ in range(RUNS):
        ours.append(_start_up(sys.executable))
        base.append(_start_up(bare))
    ratio = statistics.median(ours) / statistics.median(base)
    print(
        f"python -c pass: {statistics.median(ours) * 1000:.1f} ms with pgbroker, "
        f"{statistics.median(base) * 1000:.1f} ms in a bare venv ({ratio:.2f}x)"
    )
    assert ratio <= MAX_RATIO, (ratio, ours, base)


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "pgbroker"])
def test_schemes_resolve_without_importing_pgbroker(scheme: str) -> None:
    code = (
        "import sys\n"
        "from kombu import Connection\n"
        "from celery import Celery\n"
        f"c = Connection('{scheme}://u@h/db')\n"
        "print(type(c.transport).__module__)\n"
        f"app = Celery(broker='{scheme}://u@h/db')\n"
        "print(type(app.connection_for_write().transport).__module__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=_env()
    ).stdout.split()
    assert out == ["pgbroker.broker.transport", "pgbroker.broker.transport"]


def test_import_pgbroker_registers_when_kombu_is_already_loaded() -> None:
    """``python -S`` processes no .pth: ``import pgbroker`` after Kombu."""
    code = (
        f"import sys; sys.path[:0] = {[str(_site_packages()), *sys.path[1:]]!r}\n"
        "import kombu.transport\n"
        "assert 'postgresql' not in kombu.transport.TRANSPORT_ALIASES\n"
        "import pgbroker\n"
        "print(kombu.transport.resolve_transport('postgresql').__module__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], check=True, capture_output=True, text=True, env=_env()
    ).stdout.split()
    assert out == ["pgbroker.broker.transport"]
