"""The benchmark runs end to end at tiny sizes and reports pgbroker's figures."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "compat.bench", "--quick", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def table_row(stdout: str, label_start: str) -> list[str]:
    for line in stdout.splitlines():
        if line.startswith(f"| {label_start}"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no table row {label_start!r} in:\n{stdout}")


def test_quick_run_prints_table_with_pgbroker_figures(pg_admin_url: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = run_bench("--pg-admin-url", pg_admin_url, "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| figure" in proc.stdout and "pgbroker/Redis" in proc.stdout
    for setting in ("synchronous_commit=", "fsync=", "wal_sync_method=", "shared_buffers="):
        assert setting in proc.stdout
    assert re.search(r"machine: \d+ cores", proc.stdout)
    publish = table_row(proc.stdout, "publish msg/s")
    assert re.fullmatch(r"[\d,]+", publish[1]), publish  # a rate, not n/a

    figures = json.loads(out.read_text())["figures"]
    pg = {key: f["cells"]["pgbroker"] for key, f in figures.items()}
    assert pg["publish"]["median"] > 0 and pg["consume"]["median"] > 0
    assert pg["idle_kombu"]["median"] is not None and pg["idle_celery"]["median"] is not None
    # --quick uses sweep_interval=1: a killed consumer's messages come back
    # within about one interval (blocking drain_events must wake for the sweep).
    assert 0 < pg["redelivery_1"]["median"] < 5, pg["redelivery_1"]


def test_unreachable_systems_are_na_not_a_crash(pg_admin_url: str) -> None:
    proc = run_bench(
        "--pg-admin-url", pg_admin_url,
        "--redis-url", "redis://127.0.0.1:1/15",
        "--amqp-url", "amqp://guest:s3cret@127.0.0.1:1//",
        "--messages", "5", "--rounds", "1", "--idle-seconds", "0.2",
        "--sweep-intervals", "0.5",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    publish = table_row(proc.stdout, "publish msg/s")
    assert publish[2:4] == ["n/a", "n/a"], publish
    assert re.fullmatch(r"[\d,]+", publish[1]), publish
    assert "s3cret" not in proc.stdout + proc.stderr
