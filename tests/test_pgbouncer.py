"""pgbroker behind PgBouncer in session mode (Debian's ``pgbouncer``).

A PgBouncer of the test's own, in front of the test's database, with
``pool_mode = session`` and its default ``server_reset_query = DISCARD
ALL``. Every pgbroker session goes through it: the worker's consumer,
results, durable steps and the sweeper, and the client's publishes and
``get()`` (LISTEN). A prefork worker runs chains of durable links
(tests/apps/chains_app.py) and is SIGKILLed with its whole process group
while it holds messages; a second worker must get them back. It can only
tell that the first one died because PgBouncer resets the server session
of a client that disconnected: DISCARD ALL releases its advisory locks.

Counted as in the failover test (tests/chain_ledger.py): every chain
finishes, nothing is lost, no link is handed off twice, no completed step
runs again, no task fails; and the client's ``get()`` on each chain's last
link returns.

Skipped when ``pgbouncer`` is not installed, unless
``PGBROKER_REQUIRE_PGBOUNCER`` is set (CI installs it and sets it, so the
test cannot pass by checking nothing).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from tests import chain_ledger, localpg
from tests.celery_helpers import Celery as CeleryProcess
from tests.celery_helpers import celery_env, client_app, execute, start_worker, wait_until

pytestmark = pytest.mark.slow

CHAINS = 20
KILL_AFTER = 10
DEADLINE = 120
RESULT_TIMEOUT = 60


def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or shutil.which("/usr/sbin/pgbouncer")
    if found is None:
        if os.environ.get("PGBROKER_REQUIRE_PGBOUNCER"):
            pytest.fail("pgbouncer is not installed and PGBROKER_REQUIRE_PGBOUNCER is set")
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    return found


def answers(url: str) -> bool:
    try:
        return execute(url, "SELECT 1") == [(1,)]
    except psycopg.OperationalError:
        return False


@contextlib.contextmanager
def pgbouncer(
    db_url: str, pool_mode: str, *, password: str = "", **settings: str | int
) -> Iterator[str]:
    """A PgBouncer in front of ``db_url``'s server; yields the URL of the
    same database through it. ``password``: PgBouncer requires it of its
    clients (auth_type md5), and the URL has it. ``settings``: more
    ``[pgbouncer]`` settings, or other values for the defaults below
    (``default_pool_size=1``)."""
    binary = pgbouncer_binary()
    server = urlsplit(db_url)
    dbname = server.path.lstrip("/")
    port = localpg.free_port()
    with localpg.folder("pgbroker-pgbouncer-") as base:
        ini = {
            "listen_addr": "127.0.0.1",
            "listen_port": port,
            "unix_socket_dir": base,
            "auth_type": "md5" if password else "trust",
            "auth_file": f"{base}/userlist.txt",
            "pool_mode": pool_mode,
            "max_client_conn": 200,
            "default_pool_size": 60,
            "server_reset_query": "DISCARD ALL",
            "logfile": f"{base}/pgbouncer.log",
            "pidfile": f"{base}/pgbouncer.pid",
            **settings,
        }
        (base / "userlist.txt").write_text(f'"postgres" "{password}"\n')
        (base / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"{dbname} = host={server.hostname} port={server.port or 5432} "
            f"dbname={dbname} user={server.username or 'postgres'}\n"
            "[pgbouncer]\n" + "".join(f"{name} = {value}\n" for name, value in ini.items())
        )
        for name in ("userlist.txt", "pgbouncer.ini"):
            localpg.give_to_server_user(base / name)
        user = ["-u", localpg.OS_USER] if os.geteuid() == 0 else []
        proc = subprocess.Popen([binary, *user, str(base / "pgbouncer.ini")], cwd=base)
        try:
            login = f"postgres:{password}" if password else "postgres"
            url = f"postgresql://{login}@127.0.0.1:{port}/{dbname}"
            wait_until(lambda: answers(url), 30, "PgBouncer to answer")
            yield url
        finally:
            proc.send_signal(signal.SIGINT)  # SIGINT: safe shutdown
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def held_by(db_url: str, pid: int) -> int:
    """Messages reserved by the consumers of the worker whose main process is ``pid``."""
    rows = execute(
        db_url,
        "SELECT count(*) FROM pgbroker.message m JOIN pgbroker.consumer c "
        "ON c.id = m.consumer_id WHERE m.state = 'reserved' AND c.pid = %s",
        (pid,),
    )
    return int(rows[0][0])


def kill_while_holding(worker: CeleryProcess, db_url: str, timeout: float = 30) -> None:
    """SIGKILL ``worker``'s process group while it holds messages. Checked
    while the group is stopped (SIGSTOP), so that it cannot finish and
    acknowledge them between the check and the kill; its statements in
    flight get a moment to land first."""
    deadline = time.monotonic() + timeout
    while True:
        os.killpg(worker.proc.pid, signal.SIGSTOP)
        time.sleep(0.2)
        if held_by(db_url, worker.pid) > 0:
            worker.kill_group()
            return
        os.killpg(worker.proc.pid, signal.SIGCONT)
        assert time.monotonic() < deadline, "the worker never held messages"
        time.sleep(0.05)


@pytest.mark.timeout(DEADLINE + 120)
def test_a_worker_killed_behind_pgbouncer_in_session_mode(db_url: str, tmp_path: Path) -> None:
    with pgbouncer(db_url, "session") as url:
        with psycopg.connect(url, autocommit=True) as conn:
            chain_ledger.setup(conn)
        step_log = tmp_path / "steps.log"
        env = celery_env(url, LINK_STEP_LOG=str(step_log))
        with (
            client_app(chain_ledger.APP, url) as tasks,
            start_worker(chain_ledger.APP, env, tmp_path, "b") as b,
        ):
            with start_worker(chain_ledger.APP, env, tmp_path, "a") as a:
                a.wait_for_log("ready.", timeout=60)
                b.wait_for_log("ready.", timeout=60)
                client = chain_ledger.Client(tasks, CHAINS)
                wait_until(lambda: len(client.published) >= KILL_AFTER, 60, "the first chains")
                kill_while_holding(a, db_url)
                killed_at = time.time()
                a.wait_exit(timeout=10)
            client.thread.join(DEADLINE)
            assert not client.errors, client.errors
            chains = set(range(len(client.published)))
            chain_ledger.wait_for_chains(url, chains, DEADLINE)
            # get() through PgBouncer: the client's LISTEN, b's NOTIFY.
            for number, result in enumerate(client.results):
                assert result.get(timeout=RESULT_TIMEOUT) == f"{number}.{chain_ledger.LENGTH - 1}"
            redelivered, first = execute(
                db_url, "SELECT count(*), extract(epoch FROM min(at)) FROM pgbroker.redelivery"
            )[0]
        counts = chain_ledger.tally(db_url, chains, step_log, set(client.published))
        summary = (
            f"PgBouncer session mode: {len(client.published)} chains x {chain_ledger.LENGTH} "
            f"links, worker a SIGKILLed holding messages; {counts}; redeliveries {redelivered}, "
            f"the first {float(first or 0) - killed_at:.2f} s after the kill"
        )
        chain_ledger.assert_clean(counts, summary, db_url, b.log())
        assert redelivered > 0, summary  # a's messages came back, through the sweep
