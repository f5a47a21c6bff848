"""The benchmark runs end to end at tiny sizes and reports pgbroker's figures.

One smoke run of every part (``--quick``, RabbitMQ left out to stay well
under a minute: its code paths are the Redis ones with another URL), then
a run with unreachable systems. No timing is asserted beyond "a figure was
measured": timing targets are the benchmark's own output.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from compat import bench

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


def redis_answers() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url("redis://127.0.0.1:6379/15", socket_timeout=2).ping())
    except Exception:
        return False


def test_quick_run_of_every_part(pg_admin_url: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    chart = tmp_path / "bench.png"
    args = ["--pg-admin-url", pg_admin_url, "--json", str(out)]
    args += ["--systems", "pgbroker,redis", "--scale-systems", "pgbroker"]
    try:
        import matplotlib  # noqa: F401

        args += ["--chart", str(chart)]
    except ImportError:
        chart = None  # type: ignore[assignment]
    proc = run_bench(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout = proc.stdout

    # The settings a reader needs to judge the figures.
    for setting in ("synchronous_commit=", "fsync=", "wal_level=", "shared_buffers="):
        assert setting in stdout
    assert re.search(r"machine: \d+ cores", stdout)
    header = table_row(stdout, "figure")
    assert header[1:] == [
        "pgbroker", "Redis", "RabbitMQ", "RabbitMQ+Redis", "ratio", "target", "met",
    ]  # fmt: skip
    publish = table_row(stdout, "Kombu publish msg/s")
    assert re.fullmatch(r"[\d,]+", publish[1]), publish  # a rate, not n/a
    assert publish[6] == ">= 1.5x Redis" and publish[7] in ("met", "NOT MET"), publish

    data = json.loads(out.read_text())
    assert {"settings", "environment", "systems", "figures"} <= set(data)
    pg_env = data["environment"]["postgresql"]
    for name in (*bench.PG_SETTINGS, "server_version"):
        assert pg_env.get(name), name
    figures: dict[str, Any] = data["figures"]
    expected = {
        "publish", "consume", "celery_tasks", "latency_p50", "latency_p95", "latency_p99",
        "chains", "chord", "worker_kill", "redelivery_1", "idle_kombu", "idle_celery",
        "idle_celery_quiet", "backlog_empty", "backlog_full",
        "scale_one_1", "scale_one_2", "scale_spread_1", "scale_spread_2",
    }  # fmt: skip
    assert set(figures) == expected
    for key, f in figures.items():
        assert {
            "label",
            "part",
            "unit",
            "target",
            "bound",
            "reference",
            "ratio",
            "met",
            "cells",
        } <= set(f)
        cell = f["cells"]["pgbroker"]
        assert {"median", "values", "configured", "note", "error"} <= set(cell)
        # Every part measured pgbroker.
        assert cell["median"] is not None and cell["median"] >= 0, (key, cell)
        if f["target"]:
            assert f["met"] in (True, False) or f["cells"].get("redis", {}).get("error"), (key, f)
    assert figures["publish"]["cells"]["pgbroker"]["median"] > 0
    # --quick's Kombu redelivery uses sweep_interval=1: back within about one interval.
    assert 0 < figures["redelivery_1"]["cells"]["pgbroker"]["median"] < 5
    # The backlog figure is compared with the empty-queue figure, not with Redis.
    assert figures["backlog_full"]["target"] == ">= 0.9x empty queue"
    empty = figures["backlog_empty"]["cells"]["pgbroker"]["median"]
    assert figures["backlog_full"]["reference"] == empty
    if redis_answers():
        for key in ("publish", "celery_tasks", "latency_p50", "chains"):
            redis = figures[key]["cells"]["redis"]
            assert redis["median"], (key, redis)
            assert figures[key]["ratio"] == pytest.approx(
                figures[key]["cells"]["pgbroker"]["median"] / redis["median"]
            )
    if chart is not None:
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unreachable_systems_are_na_not_a_crash(pg_admin_url: str) -> None:
    proc = run_bench(
        "--pg-admin-url", pg_admin_url,
        "--redis-url", "redis://127.0.0.1:1/15",
        "--amqp-url", "amqp://guest:s3cret@127.0.0.1:1//",
        "--only", "kombu,celery", "--messages", "5", "--tasks", "5",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    publish = table_row(proc.stdout, "Kombu publish msg/s")
    assert publish[2:4] == ["n/a", "n/a"], publish
    assert re.fullmatch(r"[\d,]+", publish[1]), publish
    assert publish[7] == "?", publish  # no reference: the target cannot be judged
    tasks = table_row(proc.stdout, "Celery tasks/s")
    assert re.fullmatch(r"[\d,.]+", tasks[1]) and tasks[2:5] == ["n/a"] * 3, tasks
    assert "s3cret" not in proc.stdout + proc.stderr


def test_targets() -> None:
    at_least = bench.Target(">=", 1.5)
    assert at_least.check(3.0, 2.0) == (1.5, True)
    assert at_least.check(2.0, 2.0) == (1.0, False)
    assert at_least.check(None, 2.0) == (None, None)
    assert at_least.check(2.0, None) == (None, None)
    absolute = bench.Target("<", 2, "")
    assert absolute.text() == "< 2"
    assert absolute.check(1.9, None) == (None, True)
    assert absolute.check(2.0, 5.0) == (None, False)
