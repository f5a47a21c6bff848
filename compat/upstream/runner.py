"""Celery's and Kombu's own integration suites, on pgbroker and on Redis.

    python -m compat.upstream                               # everything, both systems
    python -m compat.upstream --systems pgbroker --celery canvas,tasks --kombu --check
    python -m compat.upstream --list                        # the Celery modules

Fetches the celery==5.7.0 and kombu==5.7.0 sdists with pip (they ship
``t/``), extracts Celery's ``t/integration`` and Kombu's
``t/integration/common.py`` into a work directory, and runs each Celery
module in its own pytest process with ``TEST_BROKER`` and ``TEST_BACKEND``
pointing at the system: pgbroker (a database this run creates on the
server, dropped at the end) or Redis (one database number, default 12).
Kombu's base classes are subclassed for each system by
``compat/upstream/kombu_pgbroker.py``. Prints pass/fail/skip counts and
times per module and system, every test that passes on Redis and fails on
pgbroker (with the reason from ``compat/upstream/known.py`` when it is a
known difference), and every skip reason.

Redis: Celery's suite writes fixed keys (``redis-echo``, ``redis-count``,
...) and its ``celery`` queue. Its side channel (``get_redis_connection``
in ``t/integration/tasks.py``) is pointed at the run's own database number
(the only change made to Celery's files), the keys present before the run
are noted, and only the keys the run added are deleted at the end: nothing
is flushed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from compat.upstream import known

HERE = Path(__file__).resolve().parent
VERSION = "5.7.0"
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/12"
# pgbroker runs still use Redis for the suite's side channel (tasks that
# record what ran with RPUSH): a database number of their own, so a
# pgbroker run and a Redis run can go side by side.
PG_SIDE_REDIS_DB = 11
MODULE_TIMEOUT = 3600

PYTEST_INI = """\
[pytest]
python_classes = test_*
xfail_strict = true
markers =
    flaky
    timeout
    celery
    env
"""

# Only change made to Celery's files: the side channel's Redis database.
_SIDE_FROM = "return StrictRedis(host=host, port=port, socket_timeout=None)"
_SIDE_TO = (
    "return StrictRedis(host=host, port=port, "
    'db=int(os.environ.get("REDIS_DB", "0")), socket_timeout=None)'
)


@dataclass
class Outcome:
    nodeid: str
    outcome: str  # passed, failed, error, skipped, xfailed, xpassed
    message: str = ""
    seconds: float = 0.0
    tries: int = 1


@dataclass
class ModuleRun:
    system: str
    module: str
    seconds: float
    returncode: int
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, *kinds: str) -> int:
        return sum(1 for o in self.outcomes if o.outcome in kinds)


# -- fetching ---------------------------------------------------------------


def fetch(cache: Path) -> tuple[Path, Path]:
    """The two sdists, downloaded with pip unless already in ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    names = [cache / f"celery-{VERSION}.tar.gz", cache / f"kombu-{VERSION}.tar.gz"]
    if not all(p.exists() for p in names):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--no-binary", ":all:", "-d", str(cache),
             f"celery=={VERSION}", f"kombu=={VERSION}"],
            check=True,
        )
    return names[0], names[1]


def _extract(archive: Path, prefix: str, dest: Path, keep: re.Pattern[str]) -> None:
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.startswith(prefix):
                continue
            rel = member.name[len(prefix):]
            if not keep.match(rel):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            target.write_bytes(src.read())


def prepare(celery_sdist: Path, kombu_sdist: Path, work: Path) -> tuple[Path, Path]:
    """Celery's and Kombu's test trees, each in its own directory (both
    are a package named ``t``)."""
    celery_dir, kombu_dir = work / "celery", work / "kombu"
    for d in (celery_dir, kombu_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        (d / "pytest.ini").write_text(PYTEST_INI)
    _extract(celery_sdist, f"celery-{VERSION}/", celery_dir,
             re.compile(r"t/(__init__|canvas_helpers|skip)\.py$|t/integration/"))
    tasks = celery_dir / "t/integration/tasks.py"
    text = tasks.read_text()
    if _SIDE_FROM not in text:
        raise SystemExit(f"{tasks}: get_redis_connection changed; update compat/upstream")
    tasks.write_text(text.replace(_SIDE_FROM, _SIDE_TO))
    _extract(kombu_sdist, f"kombu-{VERSION}/", kombu_dir,
             re.compile(r"t/__init__\.py$|t/integration/(__init__|common)\.py$"))
    shutil.copy(HERE / "kombu_pgbroker.py", kombu_dir / "t/integration/test_upstream_kombu.py")
    return celery_dir, kombu_dir


def celery_modules(celery_dir: Path) -> list[str]:
    return sorted(
        p.stem.removeprefix("test_") for p in (celery_dir / "t/integration").glob("test_*.py")
    )


# -- systems ----------------------------------------------------------------


def _libpq(url: str) -> str:
    return "postgresql://" + url.partition("://")[2]


def _with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")
    host = (parts.hostname or "127.0.0.1")
    netloc_s = (netloc[0] + "@" if netloc[1] else "") + f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc_s))


@contextlib.contextmanager
def pg_database(admin_url: str) -> Iterator[str]:
    """A database of this run (``pgbroker_upstream_<pid>_<hex>``), dropped
    at the end even on failure."""
    name = f"pgbroker_upstream_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(_libpq(admin_url), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_path(admin_url, "/" + name)
    finally:
        with psycopg.connect(_libpq(admin_url), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextlib.contextmanager
def redis_keys_of_run(url: str) -> Iterator[None]:
    """Delete, at the end, only the keys this run added to the database."""
    import redis

    client = redis.Redis.from_url(url)
    before = set(client.scan_iter(count=1000))
    try:
        yield
    finally:
        added = [k for k in client.scan_iter(count=1000) if k not in before]
        for i in range(0, len(added), 500):
            client.delete(*added[i:i + 500])
        client.close()


@dataclass
class System:
    name: str
    broker: str  # TEST_BROKER / UPSTREAM_KOMBU_URL
    side_db: int  # REDIS_DB of the suite's side channel
    dead: str  # a URL of the same scheme where nothing listens


# -- running ----------------------------------------------------------------


def _parse_junit(path: Path) -> list[Outcome]:
    if not path.exists():
        return []
    # pytest-rerunfailures writes one testcase per try: the last one counts.
    outcomes: dict[str, Outcome] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        cls, name = case.get("classname", ""), case.get("name", "")
        nodeid = f"{cls}.{name}" if cls else name
        kind, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                kind = "failed" if child.tag == "failure" else "error"
                message = child.get("message") or ""
            elif child.tag == "skipped":
                typ = child.get("type") or ""
                message = child.get("message") or ""
                kind = "xfailed" if typ == "pytest.xfail" else "skipped"
        tries = outcomes[nodeid].tries + 1 if nodeid in outcomes else 1
        outcomes[nodeid] = Outcome(nodeid, kind, message, float(case.get("time") or 0), tries)
    return list(outcomes.values())


def run_module(
    system: System, suite_dir: Path, path: str, label: str, out: Path,
    redis_host_port: tuple[str, int], reruns: int | None, keyword: str | None = None,
) -> ModuleRun:
    junit = out / f"{system.name}-{label}.xml"
    log = out / f"{system.name}-{label}.log"
    env = dict(os.environ)
    env.update(
        TEST_BROKER=system.broker,
        TEST_BACKEND=system.broker,
        UPSTREAM_KOMBU_URL=system.broker,
        UPSTREAM_KOMBU_DEAD_URL=system.dead,
        REDIS_HOST=redis_host_port[0],
        REDIS_PORT=str(redis_host_port[1]),
        REDIS_DB=str(system.side_db),
        PYTHONPATH=str(suite_dir),
        # test_serialization starts `celery worker` by name.
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    cmd = [
        sys.executable, "-m", "pytest", path, "-p", "celery.contrib.pytest",
        "-p", "no:cacheprovider", "-p", "no:randomly", "-n", "0", "-rs", "-v",
        f"--junitxml={junit}", "-o", "junit_family=xunit1",
    ]
    if reruns is not None:
        cmd.append(f"--force-reruns={reruns}")
    if keyword:
        cmd += ["-k", keyword]
    started = time.monotonic()
    with open(log, "wb") as fh:
        try:
            rc = subprocess.run(
                cmd, cwd=suite_dir, env=env, stdout=fh, stderr=subprocess.STDOUT,
                timeout=MODULE_TIMEOUT,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    seconds = time.monotonic() - started
    run = ModuleRun(system.name, label, seconds, rc, _parse_junit(junit))
    print(
        f"  {system.name:8} {label:36} {seconds:7.0f} s  passed {run.count('passed'):3}  "
        f"failed {run.count('failed', 'error'):3}  skipped {run.count('skipped'):3}  "
        f"xfailed {run.count('xfailed'):2}  (rc {rc}, log {log})",
        flush=True,
    )
    return run


# -- report -----------------------------------------------------------------


def _short(nodeid: str) -> str:
    return nodeid.removeprefix("t.integration.")


def report(runs: list[ModuleRun], systems: list[str]) -> list[str]:
    """Print the tables; return the pgbroker failures not in known.py."""
    by: dict[tuple[str, str], ModuleRun] = {(r.system, r.module): r for r in runs}
    modules = sorted({r.module for r in runs})
    print("\nper module (passed/failed/skipped/xfailed, seconds)")
    print(f"{'module':38}" + "".join(f"{s:>30}" for s in systems))
    totals = {s: [0, 0, 0, 0, 0.0] for s in systems}
    for m in modules:
        cells = []
        for s in systems:
            r = by.get((s, m))
            if r is None:
                cells.append(f"{'-':>30}")
                continue
            c = [r.count("passed"), r.count("failed", "error"), r.count("skipped"),
                 r.count("xfailed")]
            for i, v in enumerate(c):
                totals[s][i] += v
            totals[s][4] += r.seconds
            cells.append(f"{'/'.join(map(str, c)):>22} {r.seconds:6.0f} s")
        print(f"{m:38}" + "".join(cells))
    print(f"{'total':38}" + "".join(
        f"{'/'.join(str(int(v)) for v in totals[s][:4]):>22} {totals[s][4]:6.0f} s"
        for s in systems))

    outcome = {(r.system, o.nodeid): o for r in runs for o in r.outcomes}
    unexplained = []
    pg_fail = [(r.module, o) for r in runs if r.system == "pgbroker" for o in r.outcomes
               if o.outcome in ("failed", "error")]
    if pg_fail:
        print("\nfailed on pgbroker (Redis: its outcome in the same run)")
    for _module, o in pg_fail:
        ref = outcome.get(("redis", o.nodeid))
        why = known.reason(_short(o.nodeid))
        print(f"  {_short(o.nodeid)}  [redis: {ref.outcome if ref else 'not run'}]")
        print(f"      {why or 'UNEXPLAINED: ' + o.message[:200]}")
        if not why:
            unexplained.append(_short(o.nodeid))
    for r in runs:
        if r.system == "pgbroker" and r.returncode not in (0, 1, 5):
            print(f"  pgbroker {r.module}: pytest exited {r.returncode} (see its log)")
            unexplained.append(f"{r.module}: pytest exit {r.returncode}")

    skips: dict[str, set[str]] = {}
    for r in runs:
        for o in r.outcomes:
            if o.outcome == "skipped":
                skips.setdefault(o.message, set()).add(f"{r.system}:{r.module}")
    if skips:
        print("\nskip reasons (systems:modules)")
        for msg, where in sorted(skips.items()):
            print(f"  {msg[:150]}  [{', '.join(sorted(where))}]")
    return unexplained


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m compat.upstream", description=__doc__.split("\n")[0]
    )
    p.add_argument("--systems", default="pgbroker,redis", help="pgbroker,redis (default both)")
    p.add_argument("--celery", default="all",
                   help="Celery modules, without test_ (canvas,tasks); 'all'; 'none'")
    p.add_argument("--kombu", action=argparse.BooleanOptionalAction, default=True,
                   help="run Kombu's base classes too (default yes)")
    p.add_argument("--parallel", action="store_true", help="run the systems side by side")
    p.add_argument("--reruns", type=int, default=1,
                   help="reruns of a failed test, for every test (default 1; Celery's suite "
                        "marks its tests flaky with 5 reruns of timeouts and connection errors, "
                        "which makes one hanging test take 6 minutes); -1: the suite's own")
    p.add_argument("--pg-admin-url", default=os.environ.get("UPSTREAM_PG_ADMIN_URL", PG_ADMIN_URL),
                   help="a role that may create databases (UPSTREAM_PG_ADMIN_URL)")
    p.add_argument("--redis-url", default=os.environ.get("UPSTREAM_REDIS_URL", REDIS_URL),
                   help="the Redis reference's database (UPSTREAM_REDIS_URL); "
                        "never flushed, only the keys a run adds are deleted")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "pgbroker-upstream",
                   help="where the sdists are kept")
    p.add_argument("--out", type=Path, help="work directory (logs, junit XML); default a temp dir")
    p.add_argument("--json", type=Path, help="write every outcome here")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when a pgbroker failure is not listed in compat/upstream/known.py")
    p.add_argument("--list", action="store_true", help="list the Celery modules and exit")
    p.add_argument("-k", "--keyword",
                   help="only the tests pytest's -k selects (to reproduce one failure)")
    a = p.parse_args(argv)

    celery_sdist, kombu_sdist = fetch(a.cache)
    out = a.out or Path(tempfile.mkdtemp(prefix="pgbroker-upstream-"))
    out.mkdir(parents=True, exist_ok=True)
    celery_dir, kombu_dir = prepare(celery_sdist, kombu_sdist, out)
    all_modules = celery_modules(celery_dir)
    if a.list:
        print("\n".join(all_modules))
        return 0
    wanted = ([m for m in all_modules if m not in known.NOT_RUN] if a.celery == "all" else
              [] if a.celery == "none" else a.celery.split(","))
    for m in wanted:
        if m not in all_modules:
            p.error(f"no Celery module test_{m}.py (see --list)")
    systems = a.systems.split(",")
    redis_parts = urlsplit(a.redis_url)
    redis_hp = (redis_parts.hostname or "127.0.0.1", redis_parts.port or 6379)
    redis_db = int((redis_parts.path or "/0").strip("/") or 0)
    print(f"work directory {out}", flush=True)

    with contextlib.ExitStack() as stack:
        todo: list[System] = []
        for s in systems:
            if s == "pgbroker":
                url = stack.enter_context(pg_database(a.pg_admin_url))
                side = _with_path(a.redis_url, f"/{PG_SIDE_REDIS_DB}")
                stack.enter_context(redis_keys_of_run(side))
                todo.append(System("pgbroker", url, PG_SIDE_REDIS_DB, _with_port(url, 1)))
            elif s == "redis":
                stack.enter_context(redis_keys_of_run(a.redis_url))
                todo.append(System("redis", a.redis_url, redis_db, _with_port(a.redis_url, 1)))
            else:
                p.error(f"unknown system {s!r}")

        reruns = None if a.reruns < 0 else a.reruns

        def run_system(system: System) -> list[ModuleRun]:
            runs = []
            for m in wanted:
                runs.append(run_module(system, celery_dir, f"t/integration/test_{m}.py",
                                       f"celery:{m}", out, redis_hp, reruns, a.keyword))
            if a.kombu:
                runs.append(run_module(system, kombu_dir, "t/integration/test_upstream_kombu.py",
                                       "kombu:common", out, redis_hp, reruns, a.keyword))
            return runs

        runs: list[ModuleRun] = []
        if a.parallel:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(todo)) as pool:
                for result in pool.map(run_system, todo):
                    runs.extend(result)
        else:
            for system in todo:
                runs.extend(run_system(system))

    unexplained = report(runs, systems)
    if a.json:
        a.json.write_text(json.dumps(
            [{"system": r.system, "module": r.module, "seconds": round(r.seconds, 1),
              "returncode": r.returncode,
              "outcomes": [o.__dict__ for o in r.outcomes]} for r in runs], indent=1))
    if unexplained:
        # Named again last: CI shows the end of the output.
        print(f"\n{len(unexplained)} pgbroker failure(s) not in compat/upstream/known.py:")
        for name in unexplained:
            print(f"  {name}")
    if a.check and unexplained:
        return 1
    return 0
