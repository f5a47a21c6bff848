"""The password is never shown, whatever shape the URL is in: URLs without a
scheme, libpq's keyword=value strings, an unencoded '@' in the password, a
one-slash typo that Kombu would read as an AMQP host name. Every path a URL
is shown by (errors, ``as_uri``, the CLI, Celery's banner and retry lines)
is checked with a password that is easy to grep for."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from kombu import Connection

from pgbroker.database import sessions as db
from pgbroker.errors import ConfigurationError
from pgbroker.urls import mask_password, redact, to_conninfo
from pgbroker.urltypo import check_broker_url_typo
from tests.celery_helpers import ROOT, celery_env

PW = "GrepMe-Pw-5150"

#: URLs pgbroker does not take, each carrying PW.
BAD_URLS = [
    f"app:{PW}@db.example/jobs",  # no scheme
    f"app:{PW}@db.example:5432/jobs?sslmode=require",
    f"host=db.example password={PW} dbname=jobs",  # libpq keyword=value
    f"host=db.example password='{PW} x' dbname=jobs",
    f"host=db.example password = {PW}",
    f"dbname=jobs password='{PW}",  # unterminated quote
    f"postgresql:/app:{PW}@db.example/jobs",  # one slash
    f"postgresql:app:{PW}@db.example/jobs",  # no slash
    f"postgresql//app:{PW}@db.example/jobs",  # no colon
    f"postgres:/{PW}@db.example/jobs",
    f"app:/{PW}@db.example/jobs",
    f"mysql://app:{PW}@db.example/jobs",
    f"db.example/jobs?password={PW}",
]

#: pgbroker URLs whose password holds an unencoded '@': libpq splits at the
#: first '@' and would take the rest for the host name.
AT_URLS = [
    f"postgresql://app:{PW}@x@127.0.0.1/jobs",
    f"postgresql://app:a@{PW}@127.0.0.1/jobs",
    f"postgresql://app:a@b@{PW}@127.0.0.1/jobs",
]


@pytest.mark.parametrize("url", BAD_URLS + AT_URLS)
def test_mask_password_hides_it(url: str) -> None:
    shown = mask_password(url)
    assert PW not in shown
    assert "**" in shown
    assert PW not in redact(f"error near {url!r}", url)


def test_mask_password_keeps_the_rest() -> None:
    assert mask_password(f"app:{PW}@db/jobs") == "app:**@db/jobs"
    assert mask_password(f"host=db password={PW} dbname=x") == "host=db password=** dbname=x"
    assert mask_password(f"host=db password='{PW} x' port=1") == "host=db password=** port=1"
    assert mask_password(f"postgresql:/app:{PW}@db/jobs") == "postgresql:/app:**@db/jobs"
    # An '@' in the password does not garble the user name (the short piece
    # libpq would send is inside what is hidden already).
    assert mask_password(f"postgresql://app:a@{PW}@db/jobs") == "postgresql://app:**@db/jobs"


@pytest.mark.parametrize("url", BAD_URLS + AT_URLS)
def test_errors_do_not_show_it(url: str) -> None:
    for attempt in (to_conninfo, lambda u: db.connect(u, connect_timeout=1)):
        with pytest.raises(ConfigurationError) as info:
            attempt(url)
        assert PW not in str(info.value)


def test_keyword_strings_are_explained() -> None:
    with pytest.raises(ConfigurationError, match="not libpq's keyword=value form") as info:
        to_conninfo(f"host=db password={PW}")
    assert "host=db password=**" in str(info.value)


@pytest.mark.parametrize("url", AT_URLS)
def test_unencoded_at_in_the_password_is_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"percent-encode '@'.* as %40") as info:
        to_conninfo(url)
    assert PW not in str(info.value)
    assert "postgresql://app:**@127.0.0.1/jobs" in str(info.value)


def test_an_at_sign_after_the_host_is_fine() -> None:
    # Only the part before the host counts: a database or option may hold '@'.
    assert to_conninfo("postgresql://app:p%40ss@db/my@db?application_name=a@b")


@pytest.mark.parametrize("url", [u for u in BAD_URLS if u.startswith(("postgres", "pgbroker"))])
def test_typo_is_refused_by_kombu(url: str) -> None:
    # Without pgbroker, Kombu takes the whole text for an AMQP host name and
    # shows it in as_uri(); pgbroker's autoload hook refuses it at once.
    with pytest.raises(ConfigurationError, match="is not a URL: write postgres") as info:
        Connection(url)
    assert PW not in str(info.value)
    with pytest.raises(ConfigurationError):
        Connection(hostname=f"amqp://guest@localhost//;{url}")
    with pytest.raises(ConfigurationError):
        Connection("amqp://guest@localhost//", alternates=[url])


@pytest.mark.parametrize(
    "url",
    [
        "postgres",  # a host named postgres
        "postgres:5672",
        "postgresql://app:pw@db/jobs",
        "postgresql:///jobs",
        "amqp://guest:guest@localhost//",
        "localhost",
        None,
        ["amqp://localhost//", "redis://localhost"],
    ],
)
def test_typo_check_leaves_real_urls_alone(url: Any) -> None:
    check_broker_url_typo(url)


def test_as_uri_and_repr_of_a_pgbroker_connection() -> None:
    url = f"postgresql://app:{PW}@127.0.0.1:1/jobs?password={PW}"
    conn = Connection(url)
    assert PW not in conn.as_uri()
    assert PW not in repr(conn)
    assert conn.as_uri() == "postgresql://app:**@127.0.0.1:1/jobs?password=**"


def test_backend_as_uri() -> None:
    from celery import Celery

    app = Celery("secrets", broker="memory://", backend=f"postgresql://app:{PW}@127.0.0.1/jobs")
    assert app.backend.as_uri() == "postgresql://app:**@127.0.0.1/jobs"


# --- real processes ---------------------------------------------------------------------


def _pgbroker_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGBROKER_")}
    return subprocess.run(
        [sys.executable, "-m", "pgbroker", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize("url", BAD_URLS + AT_URLS)
def test_cli(url: str) -> None:
    result = _pgbroker_cli("migrate", "--status", "--url", url)
    assert result.returncode == 2, result
    assert PW not in result.stdout + result.stderr
    assert result.stderr.startswith("pgbroker: error: ")


@pytest.mark.parametrize("command", [["worker", "-P", "solo"], ["inspect", "ping"]])
def test_celery_with_a_one_slash_typo(command: list[str]) -> None:
    """Celery's banner and its retry lines would print the password of a
    URL Kombu reads as an AMQP host name; pgbroker stops it first."""
    url = f"postgresql:/app:{PW}@127.0.0.1:1/jobs"
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.apps.basic", *command],
        capture_output=True,
        text=True,
        env=celery_env(url),
        cwd=ROOT,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert PW not in output
    assert "broker URL 'postgresql:/app:**@127.0.0.1:1/jobs' is not a URL" in output
    assert "write postgresql://user:password@host:port/database" in output


def test_settings_reprs() -> None:
    from celery import Celery

    from pgbroker.appconfig import app_database
    from pgbroker.durable.config import DurableConfig
    from pgbroker.operations.beat import BeatConfig

    app = Celery("secrets", broker=f"postgresql://app:{PW}@127.0.0.1/jobs", set_as_current=False)
    for config in (
        BeatConfig.from_app(app),
        DurableConfig.from_app(app),
        app_database(app.conf, "beat", "beat"),
    ):
        assert PW not in repr(config)
        assert PW not in str(config)
