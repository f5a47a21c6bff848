"""The benchmark's hosts part (compat/bench_hosts.py) runs end to end at tiny
sizes: 1 and 2 worker hosts on pgbroker, a few dozen tasks each. No timing
is asserted beyond "a figure was measured"; the sessions must be seen, be
the hosts' and the client's, and stay within the documented budget."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from compat import bench, bench_hosts

ROOT = Path(__file__).resolve().parents[1]
TASKS = 40


def test_hosts_runs_only_when_named() -> None:
    assert "hosts" not in bench.parse_args([]).parts
    assert "hosts" not in bench.parse_args(["--full"]).parts
    only = bench.parse_args(["--only", "hosts"])
    assert only.parts == ("hosts",)
    assert (only.hosts, only.hosts_tasks) == ((1, 2), 100)
    full = bench.parse_args(["--full", "--only", "hosts"])
    assert (full.hosts, full.hosts_tasks) == ((1, 4, 8), 5000)
    given = bench.parse_args(["--only", "hosts", "--hosts", "1,3", "--hosts-tasks", "7"])
    assert (given.hosts, given.hosts_tasks) == ((1, 3), 7)
    assert bench_hosts.session_budget(8) == 8 * (3 + 4 * 2)


@pytest.mark.slow
def test_hosts_part_smoke(pg_admin_url: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "compat.bench", "--quick", "--only", "hosts",
            "--systems", "pgbroker", "--hosts", "1,2", "--hosts-tasks", str(TASKS),
            "--pg-admin-url", pg_admin_url, "--json", str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    figures: dict[str, Any] = data["figures"]
    expected = {f"hosts_{n}_tasks" for n in (1, 2)} | {f"hosts_{n}_sessions" for n in (1, 2)}
    parts = (*bench_hosts.CPU_PARTS, "database")
    expected |= {f"hosts_{n}_cpu_{p}" for n in (1, 2) for p in parts}
    assert set(figures) == expected
    for key, f in figures.items():
        cell = f["cells"]["pgbroker"]
        assert not cell["error"] or (
            "_cpu_" in key and "not a local process" in cell["error"]  # PostgreSQL in a container
        ), (key, cell)
        if not cell["error"]:
            assert cell["median"] is not None and cell["median"] >= 0, (key, cell)
    env = data["environment"]["hosts"]
    assert set(env) == {"1", "2"}
    for n in (1, 2):
        assert figures[f"hosts_{n}_tasks"]["cells"]["pgbroker"]["median"] > 0
        assert figures[f"hosts_{n}_cpu_workers"]["cells"]["pgbroker"]["median"] > 0
        assert figures[f"hosts_{n}_cpu_client"]["cells"]["pgbroker"]["median"] > 0
        database = figures[f"hosts_{n}_cpu_database"]["cells"]["pgbroker"]
        assert database["median"] or "not a local process" in database["error"], database
        (run,) = env[str(n)]["pgbroker"]
        # Every timed task ran on one of the hosts (their logs say so).
        assert len(run["tasks_per_host"]) == n and sum(run["tasks_per_host"]) == TASKS, run
        s = run["sessions"]
        budget = bench_hosts.session_budget(n)
        assert run["session_budget"] == budget
        # Each host's main process holds sessions (its consumer at least),
        # the client holds its own, and the workers stay within the budget.
        assert n <= s["workers"] <= budget, s
        assert 1 <= s["per_host"] <= bench_hosts.SESSIONS_PER_HOST, s
        assert s["client"] >= 1 and s["total"] >= max(s["workers"], s["client"]), s
        assert s["samples"] >= 2, s
        sessions = figures[f"hosts_{n}_sessions"]
        assert sessions["cells"]["pgbroker"]["median"] == s["workers"]
        assert sessions["target"] == f"<= {budget}" and sessions["met"] is True
    stdout = proc.stdout
    rate = r"^\| hosts: 2 hosts \(worker -c 2 each\), tasks/s, 40 no-op +\| +[\d,.]+ \|"
    assert re.search(rate, stdout, re.M), stdout
    peak = r"^\| hosts: 2 hosts, peak sessions of the workers .*\| +\d+ \|"
    assert re.search(peak, stdout, re.M), stdout
    assert "hosts 2, pgbroker sessions (peaks): all " in stdout
