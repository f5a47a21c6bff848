"""URL handling: what psycopg is given, and what users are shown (no database)."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from pgbroker.errors import ConfigurationError
from pgbroker.urls import mask_password, passwords, redact, to_conninfo


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "pgbroker", "PostgreSQL"])
def test_to_conninfo_accepts_pgbroker_schemes(scheme: str) -> None:
    url = f"{scheme}://app:pw@db.example:6432/jobs?sslmode=require&application_name=x"
    conninfo = to_conninfo(url)
    assert conninfo == "postgresql://app:pw@db.example:6432/jobs?sslmode=require&application_name=x"
    assert conninfo_to_dict(conninfo) == {
        "user": "app",
        "password": "pw",
        "host": "db.example",
        "port": "6432",
        "dbname": "jobs",
        "sslmode": "require",
        "application_name": "x",
    }


@pytest.mark.parametrize(
    "url",
    [
        "mysql://app:Sekr1t-pw@db/jobs",
        "redis://:Sekr1t-pw@localhost:6379/0",
        "amqp://guest:Sekr1t-pw@localhost//",
        "postgresql:/app:Sekr1t-pw@db/jobs",
        "db.example:5432/jobs",
    ],
)
def test_to_conninfo_rejects_other_urls_without_showing_the_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        to_conninfo(url)
    text = str(info.value)
    assert "Sekr1t-pw" not in text
    assert "postgresql://user:password@host:port/database" in text


def test_to_conninfo_explains_sqlalchemy_style_urls() -> None:
    # Kombu strips "postgresql+" and passes the driver name as the scheme.
    with pytest.raises(ConfigurationError, match=r"SQLAlchemy URL.*drop the '\+psycopg'") as info:
        to_conninfo("psycopg://app:Sekr1t-pw@db/jobs")
    assert "Sekr1t-pw" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://app:Sekr1t@db:5432/jobs", "postgresql://app:**@db:5432/jobs"),
        ("postgresql://app@db/jobs", "postgresql://app@db/jobs"),
        ("postgresql://db/jobs", "postgresql://db/jobs"),
        ("postgresql://app:@/jobs?host=/tmp/sock", "postgresql://app:**@/jobs?host=/tmp/sock"),
        # The query string is kept exactly as written, only the value goes.
        (
            "postgresql://app@/jobs?host=/tmp/sock&password=Sekr1t&sslmode=disable",
            "postgresql://app@/jobs?host=/tmp/sock&password=**&sslmode=disable",
        ),
        ("postgresql://app@db/jobs?PASSWORD=Sekr1t", "postgresql://app@db/jobs?PASSWORD=**"),
        # Percent-encoded and special characters.
        ("postgresql://app:p%40ss%2Fw@db/jobs", "postgresql://app:**@db/jobs"),
        ("postgresql://app:pa?ss@db/jobs", "postgresql://app:**@db/jobs"),
        ("postgresql://app:pa/ss@db/jobs", "postgresql://app:**@db/jobs"),
        ("postgresql://app:pa@ss@db/jobs", "postgresql://app:**@db/jobs"),
        # A password that also occurs elsewhere does not garble the URL.
        (
            "postgresql://postgres:postgres@localhost/postgres",
            "postgresql://postgres:**@localhost/postgres",
        ),
    ],
)
def test_mask_password(url: str, masked: str) -> None:
    assert mask_password(url) == masked


def test_mask_password_custom_mask_and_unparsable_url() -> None:
    assert mask_password("postgresql://a:b@h/d", mask="XXX") == "postgresql://a:XXX@h/d"
    assert mask_password("postgresql://a:b@[::1/d") == "<unparsable URL>"


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("postgresql://app:Sekr1t@db/jobs", "Sekr1t"),
        ("postgresql://app@db/jobs?password=Sekr1t", "Sekr1t"),
        ("postgresql://app:p%40ss@db/jobs", "p@ss"),
        ("postgresql://app:s3cr%ZZet@db/jobs", "s3cr%ZZet"),  # libpq rejects this URL
    ],
)
def test_redact_hides_every_spelling(url: str, secret: str) -> None:
    assert secret in passwords(url)
    text = f'bad URI "{url}" near {secret}'
    out = redact(text, url)
    assert secret not in out
    assert "**" in out


def test_passwords_of_url_without_password() -> None:
    assert passwords("postgresql://app@db/jobs") == []
    assert passwords("postgresql://db:5432/jobs?user=a@b") == []
