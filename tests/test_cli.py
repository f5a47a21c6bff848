"""``pgbroker migrate``, run as a user runs it: a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from pgbroker.database import schema
from tests import pgserver

SECRET = "Sekr1t-cli-77hd"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PGBROKER_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pgbroker", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
    )


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The process failed the way the CLI promises: exit 2, one line on stderr."""
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pgbroker: error: ")
    assert "Traceback" not in result.stderr
    assert SECRET not in result.stderr
    return lines[0]


def _with_password(url: str) -> str:
    scheme, rest = url.split("://", 1)
    userinfo, _, hostpart = rest.rpartition("@")
    user = userinfo.split(":", 1)[0] if userinfo else "postgres"
    return f"{scheme}://{user}:{SECRET}@{hostpart if userinfo else rest}"


def _schema_exists(url: str, name: str) -> bool:
    with psycopg.connect(pgserver.libpq_url(url)) as c:
        row = c.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", [name]).fetchone()
    return row == (1,)


def _versions(url: str, name: str) -> list[int]:
    with psycopg.connect(pgserver.libpq_url(url)) as c:
        q = psycopg.sql.SQL("SELECT version FROM {}.schema_version ORDER BY 1").format(
            psycopg.sql.Identifier(name)
        )
        return [r[0] for r in c.execute(q).fetchall()]


def test_help_names_every_environment_variable() -> None:
    top = run("--help")
    assert top.returncode == 0
    assert "migrate" in top.stdout
    # An URL in the environment (with its password) is not shown in --help.
    result = run("migrate", "--help", env={"PGBROKER_URL": f"postgresql://u:{SECRET}@h/d"})
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--url URL" in text and "[env: PGBROKER_URL]" in text
    assert "--schema NAME" in text and "[env: PGBROKER_SCHEMA]" in text
    assert "--status" in text and "--sql" in text
    assert SECRET not in result.stdout


def test_status_sql_and_migrate(empty_db_url: str) -> None:
    url = _with_password(empty_db_url)
    latest = schema.latest_version()
    names = [f"{m.version:03d}_{m.name}" for m in schema.migrations()]

    status = run("migrate", "--status", "--url", url)
    assert status.returncode == 1, status  # pending
    assert "current:  none" in status.stdout
    assert f"latest:   {latest}" in status.stdout
    assert f"{latest} pending ({', '.join(names)})" in status.stdout
    assert SECRET not in status.stdout + status.stderr

    sql_run = run("migrate", "--sql", "--url", url)
    assert sql_run.returncode == 0, sql_run
    assert 'CREATE TABLE "pgbroker".message' in sql_run.stdout
    assert "BEGIN;" in sql_run.stdout and "COMMIT;" in sql_run.stdout
    assert not _schema_exists(url, "pgbroker")  # printed, not applied

    applied = run("migrate", "--url", url)
    assert applied.returncode == 0, applied
    assert f"applied {', '.join(names)}; now at version {latest}" in applied.stdout
    assert SECRET not in applied.stdout
    assert _versions(url, "pgbroker") == list(range(1, latest + 1))

    again = run("migrate", "--url", url)
    assert again.returncode == 0
    assert f"already at version {latest}; nothing to do" in again.stdout

    status = run("migrate", "--status", "--url", url)
    assert status.returncode == 0
    assert "state:    up to date" in status.stdout
    assert f"current:  {latest}" in status.stdout

    nothing = run("migrate", "--sql", "--url", url)
    assert nothing.returncode == 0
    assert nothing.stdout.startswith("-- schema 'pgbroker' is up to date")


def test_sql_for_a_new_database_needs_no_connection(empty_db_url: str) -> None:
    result = run("migrate", "--sql", "--schema", "dba jobs")
    assert result.returncode == 0, result
    assert result.stdout.startswith('-- pgbroker schema "dba jobs": version 0 -> ')
    # A DBA runs it by hand; pgbroker then finds the schema current.
    with psycopg.connect(pgserver.libpq_url(empty_db_url), autocommit=True) as c:
        c.execute(result.stdout)
    status = run("migrate", "--status", "--url", empty_db_url, "--schema", "dba jobs")
    assert status.returncode == 0, status
    assert "state:    up to date" in status.stdout


def test_bad_schema_name() -> None:
    line = _one_line_error(run("migrate", "--sql", "--schema", ""))
    assert "--schema must be a name of 1 to 63 bytes" in line


def test_environment_variables_and_python_dash_m(empty_db_url: str) -> None:
    env = {"PGBROKER_URL": _with_password(empty_db_url), "PGBROKER_SCHEMA": "jobs"}
    result = run("migrate", env=env)
    assert result.returncode == 0, result
    assert "schema 'jobs'" in result.stdout
    assert _schema_exists(empty_db_url, "jobs")
    assert not _schema_exists(empty_db_url, "pgbroker")
    # Flags win over the environment.
    result = run("migrate", "--schema", "other", env=env)
    assert result.returncode == 0, result
    assert _schema_exists(empty_db_url, "other")


def test_console_script(empty_db_url: str) -> None:
    script = Path(sys.executable).with_name("pgbroker")
    if not script.exists():
        pytest.skip("pgbroker console script not installed next to the interpreter")
    result = subprocess.run(
        [str(script), "migrate", "--status", "--url", empty_db_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result
    assert "current:  none" in result.stdout


def test_newer_schema_is_refused(db_url: str) -> None:
    ahead = schema.latest_version() + 1
    with psycopg.connect(pgserver.libpq_url(db_url), autocommit=True) as c:
        c.execute("INSERT INTO pgbroker.schema_version (version, name) VALUES (%s, 'x')", [ahead])
    status = run("migrate", "--status", "--url", db_url)
    assert status.returncode == 1
    assert "newer than this pgbroker" in status.stdout
    line = _one_line_error(run("migrate", "--url", db_url))
    assert f"is at version {ahead}, newer than this pgbroker" in line
    assert "upgrade the pgbroker package" in line


def test_missing_url() -> None:
    line = _one_line_error(run("migrate"))
    assert "no database URL: pass --url" in line
    assert "PGBROKER_URL" in line


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"postgresql://app:{SECRET}@127.0.0.1:1/jobs", "is PostgreSQL running"),
        (f"postgresql://app@127.0.0.1:1/jobs?password={SECRET}", "is PostgreSQL running"),
        (f"mysql://app:{SECRET}@127.0.0.1/jobs", "unsupported URL 'mysql://app:**@"),
        (f"postgresql://app:{SECRET}%ZZ@127.0.0.1/jobs", "invalid percent-encoded token"),
    ],
)
def test_errors_are_one_line_without_password(url: str, expected: str) -> None:
    for mode in ([], ["--status"], ["--sql"]):
        line = _one_line_error(run("migrate", *mode, "--url", url))
        assert expected in line


def test_missing_database(pg_admin_url: str) -> None:
    url = _with_password(pgserver.url_for(pg_admin_url, "pgbroker_cli_no_such_db"))
    line = _one_line_error(run("migrate", "--url", url))
    assert "the database does not exist: create it (createdb pgbroker_cli_no_such_db)" in line


def test_usage_errors() -> None:
    result = run("migrate", "--status", "--sql")
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr
    result = run()
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
