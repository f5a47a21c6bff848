"""Durable steps in-process, against a real PostgreSQL.

Tasks run with ``Task.apply(task_id=...)``: the same code path as in a
worker (Celery's tracer, a request with the task id), and a second apply
with the same id is what a retry or a redelivery does.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from celery import Celery

from pgbroker.durable import DurableTask, prune, recorded_steps
from pgbroker.durable.config import DurableConfig, close_pools
from pgbroker.errors import (
    ConfigurationError,
    NonDeterministicWorkflow,
    SchemaError,
    StepOutputError,
)
from tests.celery_helpers import wait_until
from tests.pgserver import libpq_url


@pytest.fixture(autouse=True)
def _close_durable_pools() -> Iterator[None]:
    yield
    close_pools()


def make_app(url: str, **conf: Any) -> Celery:
    app = Celery("durable_unit", set_as_current=False)
    app.conf.update(broker_url=url, **conf)
    return app


@pytest.fixture
def app(db_url: str) -> Iterator[Celery]:
    app = make_app(db_url)
    yield app
    app.close()


def run(task: Any, *args: Any, task_id: str) -> Any:
    """Run ``task`` as a worker would, with this id; raise what it raises."""
    return task.apply(args, task_id=task_id, throw=True).get()


def steps(db: psycopg.Connection, task_id: str) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT step_index, name, state, attempts, error FROM pgbroker.durable_step "
        "WHERE task_id = %s ORDER BY step_index",
        [task_id],
    ).fetchall()


class Boom(Exception):
    pass


# --- replay --------------------------------------------------------------------------


def test_completed_steps_replay_their_output_on_the_same_task_id(
    app: Celery, db: psycopg.Connection
) -> None:
    calls: list[str] = []
    fail_last = [True]

    def create_account(user: int) -> dict[str, Any]:
        calls.append("create")
        return {"user": user, "account": uuid.uuid4().hex}  # differs on every call

    def charge(account: dict[str, Any]) -> str:
        calls.append("charge")
        return f"charge-{account['account']}"

    def welcome(account: dict[str, Any], charge_id: str) -> str:
        calls.append("welcome")
        if fail_last[0]:
            raise Boom("mail server down")
        return "sent"

    @app.task(shared=False, bind=True, base=DurableTask)
    def onboard(self: DurableTask, user: int) -> list[Any]:
        account = self.step("create_account", create_account, user)
        charge_id = self.step("charge", charge, account)
        mail = self.step("welcome_email", welcome, account, charge_id)
        return [account, charge_id, mail]

    with pytest.raises(Boom):
        run(onboard, 7, task_id="t1")
    assert calls == ["create", "charge", "welcome"]
    assert steps(db, "t1") == [
        (0, "create_account", "done", 1, None),
        (1, "charge", "done", 1, None),
        (2, "welcome_email", "failed", 1, "Boom: mail server down"),
    ]
    first = recorded_steps(db, "t1")

    fail_last[0] = False
    account, charge_id, mail = run(onboard, 7, task_id="t1")
    # Steps 0 and 1 did not run again; their recorded outputs came back.
    assert calls == ["create", "charge", "welcome", "welcome"]
    assert account == first[0].output and account["user"] == 7
    assert charge_id == f"charge-{account['account']}" == first[1].output
    assert mail == "sent"
    assert steps(db, "t1")[2] == (2, "welcome_email", "done", 2, "Boom: mail server down")

    # Another task id is another workflow: everything runs.
    run(onboard, 8, task_id="t2")
    assert calls[4:] == ["create", "charge", "welcome"]


def test_a_renamed_step_raises_non_deterministic_workflow(
    app: Celery, db: psycopg.Connection
) -> None:
    calls: list[str] = []

    def note(what: str) -> str:
        calls.append(what)
        return what

    @app.task(shared=False, bind=True, base=DurableTask)
    def v1(self: DurableTask) -> None:
        self.step("reserve", note, "reserve")
        self.step("charge", note, "charge")
        raise Boom("crash after charge")

    @app.task(shared=False, bind=True, base=DurableTask)
    def v2(self: DurableTask) -> None:
        self.step("reserve", note, "reserve")
        self.step("refund", note, "refund")  # not what the first run recorded

    with pytest.raises(Boom):
        run(v1, task_id="wf")
    with pytest.raises(NonDeterministicWorkflow) as info:
        run(v2, task_id="wf")
    message = str(info.value)
    assert "step 1 is 'refund' in this run" in message
    assert "recorded step 1 as 'charge'" in message
    assert "[wf]" in message
    assert calls == ["reserve", "charge"]  # neither replay nor refund ran
    assert [r[1] for r in steps(db, "wf")] == ["reserve", "charge"]


def test_direct_call_runs_steps_without_records(app: Celery, db: psycopg.Connection) -> None:
    @app.task(shared=False, bind=True, base=DurableTask)
    def plain(self: DurableTask, x: int) -> int:
        return self.step("double", lambda v: v * 2, x) + self.step("inc", lambda v: v + 1, x)

    assert plain(5) == 16
    assert plain(5) == 16
    assert db.execute("SELECT count(*) FROM pgbroker.durable_step").fetchone() == (0,)


def test_step_arguments_and_keywords(app: Celery, db: psycopg.Connection) -> None:
    def greet(name: str, *, greeting: str) -> str:
        return f"{greeting}, {name}"

    @app.task(shared=False, bind=True, base=DurableTask)
    def hello(self: DurableTask) -> str:
        return self.step("greet", greet, "Ada", greeting="Hello")

    assert run(hello, task_id="h") == "Hello, Ada"
    with pytest.raises(ValueError, match="retries"):
        hello.step("x", greet, retries=-1)
    with pytest.raises(TypeError, match="name"):
        hello.step("", greet)


# --- the caller's transaction -----------------------------------------------------------


@pytest.fixture
def ledger(db: psycopg.Connection) -> None:
    db.execute("CREATE TABLE ledger (id serial PRIMARY KEY, entry text NOT NULL)")


def ledger_entries(db: psycopg.Connection) -> list[str]:
    return [r[0] for r in db.execute("SELECT entry FROM ledger ORDER BY id").fetchall()]


def add_entry(conn: psycopg.Connection, entry: str) -> int:
    row = conn.execute("INSERT INTO ledger (entry) VALUES (%s) RETURNING id", [entry]).fetchone()
    assert row is not None
    return int(row[0])


def test_step_with_conn_commits_work_and_checkpoint_together(
    app: Celery, db: psycopg.Connection, db_url: str, ledger: None
) -> None:
    calls = []

    def debit(conn: psycopg.Connection, amount: int) -> int:
        calls.append(amount)
        return add_entry(conn, f"debit {amount}")

    @app.task(shared=False, bind=True, base=DurableTask)
    def pay(self: DurableTask, amount: int, fail: bool) -> int:
        with psycopg.connect(libpq_url(db_url), autocommit=True) as conn:
            entry = self.step("debit", debit, conn, amount, conn=conn)
        if fail:
            raise Boom("after the debit")
        return entry

    with pytest.raises(Boom):
        run(pay, 10, True, task_id="p1")
    assert ledger_entries(db) == ["debit 10"]
    assert steps(db, "p1") == [(0, "debit", "done", 1, None)]
    assert run(pay, 10, False, task_id="p1") == 1  # replayed: the first entry's id
    assert ledger_entries(db) == ["debit 10"]
    assert calls == [10]


def test_failed_step_with_conn_rolls_back_its_work(
    app: Celery, db: psycopg.Connection, db_url: str, ledger: None
) -> None:
    fail = [True]

    def debit(conn: psycopg.Connection) -> int:
        entry = add_entry(conn, "debit")
        if fail[0]:
            raise Boom("card declined")
        return entry

    @app.task(shared=False, bind=True, base=DurableTask)
    def pay(self: DurableTask) -> int:
        with psycopg.connect(libpq_url(db_url), autocommit=True) as conn:
            return self.step("debit", debit, conn, conn=conn)

    with pytest.raises(Boom):
        run(pay, task_id="p")
    assert ledger_entries(db) == []  # the insert rolled back with the step
    assert steps(db, "p") == [(0, "debit", "failed", 1, "Boom: card declined")]
    fail[0] = False
    run(pay, task_id="p")
    assert ledger_entries(db) == ["debit"]
    assert steps(db, "p") == [(0, "debit", "done", 2, "Boom: card declined")]


def test_checkpoint_rolls_back_with_the_callers_transaction(
    app: Celery, db: psycopg.Connection, db_url: str, ledger: None
) -> None:
    """On a connection with a transaction open, the step's checkpoint is part
    of the caller's transaction: rolled back with it, the step runs again."""
    calls = []
    fail = [True]

    def move(conn: psycopg.Connection, entry: str) -> str:
        calls.append(entry)
        add_entry(conn, entry)
        return entry

    @app.task(shared=False, bind=True, base=DurableTask)
    def transfer(self: DurableTask) -> list[str]:
        # Not autocommit: commits when the block exits, rolls back on error.
        with psycopg.connect(libpq_url(db_url)) as conn:
            conn.execute("SELECT 1")  # a transaction is open from here
            out = [
                self.step("debit", move, conn, "debit", conn=conn),
                self.step("credit", move, conn, "credit", conn=conn),
            ]
            if fail[0]:
                # Uncommitted: another session sees neither work nor checkpoint.
                assert steps(db, self.request.id) == []
                assert ledger_entries(db) == []
                raise Boom("before commit")
        return out

    with pytest.raises(Boom):
        run(transfer, task_id="tr")
    assert ledger_entries(db) == []
    assert steps(db, "tr") == []
    fail[0] = False
    assert run(transfer, task_id="tr") == ["debit", "credit"]
    assert calls == ["debit", "credit", "debit", "credit"]  # the rollback undid both
    assert ledger_entries(db) == ["debit", "credit"]
    assert [r[:3] for r in steps(db, "tr")] == [(0, "debit", "done"), (1, "credit", "done")]
    run(transfer, task_id="tr")
    assert len(calls) == 4 and ledger_entries(db) == ["debit", "credit"]


def test_two_runs_racing_on_a_conn_step_keep_only_the_first_commit(
    app: Celery, db: psycopg.Connection, db_url: str, ledger: None
) -> None:
    """A duplicate run that reaches the step while the first run has not
    committed yet waits for it, then rolls its own work back and goes on with
    the first run's output."""
    stepped = threading.Event()
    release = threading.Event()

    @app.task(shared=False, bind=True, base=DurableTask)
    def pay(self: DurableTask, who: str, hold: bool) -> str:
        with psycopg.connect(libpq_url(db_url)) as conn:
            entry = self.step("pay", add_entry, conn, who, conn=conn)
            if hold:
                stepped.set()
                assert release.wait(30)
        return f"{who} got entry {entry}"

    results: dict[str, Any] = {}

    def run_in_thread(who: str, hold: bool) -> None:
        try:
            results[who] = run(pay, who, hold, task_id="dup")
        except BaseException as exc:
            results[who] = exc

    first = threading.Thread(target=run_in_thread, args=("first", True))
    first.start()
    assert stepped.wait(30)
    second = threading.Thread(target=run_in_thread, args=("second", False))
    second.start()
    # The second run's checkpoint waits on the first one's uncommitted row.
    wait_until(
        lambda: (
            db.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()"
            ).fetchone()
            == (1,)
        ),
        15,
        "the second run to wait for the first one's checkpoint",
    )
    release.set()
    first.join(30)
    second.join(30)
    assert results["first"] == "first got entry 1"
    # The second run's insert (entry 2) rolled back; it got entry 1.
    assert results["second"] == "second got entry 1"
    assert ledger_entries(db) == ["first"]


def test_conn_on_another_database_is_a_clear_error(
    app: Celery, empty_db_url: str, db_url: str
) -> None:
    @app.task(shared=False, bind=True, base=DurableTask)
    def wrong(self: DurableTask) -> None:
        with psycopg.connect(libpq_url(empty_db_url), autocommit=True) as conn:
            self.step("s", lambda: 1, conn=conn)

    with pytest.raises(ConfigurationError, match=r"no table pgbroker\.durable_step"):
        run(wrong, task_id="w")


# --- retries -------------------------------------------------------------------------


def test_retries_with_exponential_backoff_are_recorded(app: Celery, db: psycopg.Connection) -> None:
    times: list[float] = []

    def flaky() -> str:
        times.append(time.monotonic())
        if len(times) < 3:
            raise TimeoutError(f"try {len(times)}")
        return "ok"

    @app.task(shared=False, bind=True, base=DurableTask)
    def task(self: DurableTask) -> str:
        return self.step("call_api", flaky, retries=3, backoff=0.2)

    assert run(task, task_id="r") == "ok"
    assert len(times) == 3
    gaps = [times[1] - times[0], times[2] - times[1]]
    assert 0.2 <= gaps[0] < 0.2 + 5  # backoff, then doubled
    assert 0.4 <= gaps[1] < 0.4 + 5
    assert steps(db, "r") == [(0, "call_api", "done", 3, "TimeoutError: try 2")]


def test_spent_retries_record_a_failed_step(app: Celery, db: psycopg.Connection) -> None:
    calls = []
    broken = [True]

    def api() -> str:
        calls.append(1)
        if broken[0]:
            raise ConnectionError("refused")
        return "ok"

    @app.task(shared=False, bind=True, base=DurableTask)
    def task(self: DurableTask) -> str:
        return self.step("call_api", api, retries=2, backoff=0.01)

    with pytest.raises(ConnectionError):
        run(task, task_id="f")
    assert len(calls) == 3
    assert steps(db, "f") == [(0, "call_api", "failed", 3, "ConnectionError: refused")]
    broken[0] = False
    assert run(task, task_id="f") == "ok"
    assert steps(db, "f") == [(0, "call_api", "done", 4, "ConnectionError: refused")]


def test_only_retry_on_exceptions_are_retried(app: Celery, db: psycopg.Connection) -> None:
    calls = []

    def bad() -> None:
        calls.append(1)
        raise KeyError("missing")

    @app.task(shared=False, bind=True, base=DurableTask)
    def task(self: DurableTask) -> None:
        self.step("lookup", bad, retries=5, backoff=0.01, retry_on=TimeoutError)

    with pytest.raises(KeyError):
        run(task, task_id="k")
    assert len(calls) == 1
    assert steps(db, "k")[0][2:4] == ("failed", 1)


def test_each_attempt_of_a_conn_step_is_its_own_transaction(
    app: Celery, db: psycopg.Connection, db_url: str, ledger: None
) -> None:
    attempts = []

    def debit(conn: psycopg.Connection) -> int:
        attempts.append(1)
        entry = add_entry(conn, f"attempt {len(attempts)}")
        if len(attempts) < 3:
            raise TimeoutError("gateway")
        return entry

    @app.task(shared=False, bind=True, base=DurableTask)
    def pay(self: DurableTask) -> int:
        with psycopg.connect(libpq_url(db_url)) as conn:
            return self.step("debit", debit, conn, conn=conn, retries=3, backoff=0.01)

    assert run(pay, task_id="c") == 3
    assert ledger_entries(db) == ["attempt 3"]  # attempts 1 and 2 rolled back
    assert steps(db, "c") == [(0, "debit", "done", 3, "TimeoutError: gateway")]


# --- outputs -------------------------------------------------------------------------


def test_outputs_are_the_decoded_value_on_first_run_and_replay(
    app: Celery, db: psycopg.Connection, db_url: str, ledger: None
) -> None:
    @app.task(shared=False, bind=True, base=DurableTask)
    def shapes(self: DurableTask) -> list[Any]:
        return [self.step("pair", lambda: (1, 2)), self.step("keys", lambda: {1: "a"})]

    first = shapes.apply(task_id="s", throw=True).get()
    assert first == [[1, 2], {"1": "a"}]  # as json gives them back, first time too
    assert shapes.apply(task_id="s", throw=True).get() == first

    @app.task(shared=False, bind=True, base=DurableTask)
    def bad(self: DurableTask) -> None:
        with psycopg.connect(libpq_url(db_url), autocommit=True) as conn:
            self.step("s", lambda: add_entry(conn, "x") and {1, 2}, conn=conn, retries=3)

    with pytest.raises(StepOutputError, match=r"returned a 'set' value .* 'json' cannot encode"):
        run(bad, task_id="b")
    assert ledger_entries(db) == []  # encoding failed inside the transaction: rolled back
    assert steps(db, "b")[0][2:4] == ("failed", 1)  # not retried: it would fail again

    @app.task(shared=False, bind=True, base=DurableTask)
    def pooled(self: DurableTask) -> None:
        self.step("obj", object)

    with pytest.raises(StepOutputError, match=r"step 0 \('obj'\) returned a 'object' value"):
        run(pooled, task_id="o")
    assert steps(db, "o")[0][2:4] == ("failed", 1)

    @app.task(shared=False, bind=True, base=DurableTask)
    def rich(self: DurableTask) -> Any:
        return self.step("rich", lambda: [b"raw", datetime(2030, 1, 2), Decimal("1.50")])

    assert run(rich, task_id="r") == [b"raw", datetime(2030, 1, 2), Decimal("1.50")]
    assert run(rich, task_id="r") == [b"raw", datetime(2030, 1, 2), Decimal("1.50")]


def test_pickle_serializer_keeps_python_objects(db_url: str, db: psycopg.Connection) -> None:
    app = make_app(db_url, result_serializer="pickle", accept_content=["json", "pickle"])

    @app.task(shared=False, bind=True, base=DurableTask)
    def task(self: DurableTask) -> Any:
        return self.step("set", lambda: {1, 2, (3, 4)})

    assert run(task, task_id="p") == {1, 2, (3, 4)}
    assert run(task, task_id="p") == {1, 2, (3, 4)}
    row = db.execute("SELECT content_type FROM pgbroker.durable_step").fetchone()
    assert row == ("application/x-python-serialize",)


# --- pruning -------------------------------------------------------------------------


def test_succeeded_tasks_keep_their_steps_for_the_configured_time(
    db_url: str, db: psycopg.Connection
) -> None:
    app = make_app(db_url, pgbroker_durable_keep=3600)

    @app.task(shared=False, bind=True, base=DurableTask)
    def kept(self: DurableTask, fail: bool) -> None:
        self.step("a", lambda: 1)
        if fail:
            raise Boom()

    @app.task(shared=False, bind=True, base=DurableTask, durable_keep=0)
    def dropped(self: DurableTask) -> None:
        self.step("a", lambda: 1)

    with pytest.raises(Boom):
        run(kept, True, task_id="k")
    # A failed run leaves its steps without an expiry: it may resume.
    q = "SELECT expires_at - now() FROM pgbroker.durable_step WHERE task_id = %s"
    assert db.execute(q, ["k"]).fetchall() == [(None,)]
    run(kept, False, task_id="k")
    left = db.execute(q, ["k"]).fetchone()
    assert left is not None and timedelta(minutes=59) < left[0] <= timedelta(hours=1)
    run(dropped, task_id="d")
    assert steps(db, "d") == []  # keep 0: deleted when the task succeeded


def test_workers_prune_expired_steps_after_success(db_url: str, db: psycopg.Connection) -> None:
    app = make_app(db_url, pgbroker_durable_keep=0.2, pgbroker_durable_prune_interval=0.05)

    @app.task(shared=False, bind=True, base=DurableTask)
    def task(self: DurableTask) -> None:
        self.step("a", lambda: 1)

    run(task, task_id="old")
    assert len(steps(db, "old")) == 1
    time.sleep(0.4)  # on purpose: the keep time (0.2 s) elapses
    run(task, task_id="new")  # its success prunes what expired
    assert steps(db, "old") == []
    assert len(steps(db, "new")) == 1


def test_prune_removes_expired_and_idle_tasks(db_url: str, db: psycopg.Connection) -> None:
    app = make_app(db_url, pgbroker_durable_prune_interval=0)

    def two_steps(self: DurableTask, fail: bool) -> None:
        self.step("a", lambda: 1)
        self.step("b", lambda: 2)
        if fail:
            raise Boom()

    task = app.task(shared=False, bind=True, base=DurableTask, name="task")(two_steps)
    expiring = app.task(
        shared=False, bind=True, base=DurableTask, name="expiring", durable_keep=0.2
    )(two_steps)
    run(expiring, False, task_id="expired")
    run(task, False, task_id="kept")  # kept one day
    for task_id in ("idle", "busy", "recent"):
        with pytest.raises(Boom):
            run(task, True, task_id=task_id)
    # Simulate age: 'idle' untouched for two days, 'busy' has one old step.
    db.execute(
        "UPDATE pgbroker.durable_step SET updated_at = now() - interval '2 days' "
        "WHERE task_id = 'idle' OR (task_id = 'busy' AND step_index = 0)"
    )
    time.sleep(0.3)  # on purpose: the keep time of 'expired' (0.2 s) elapses
    assert prune(db_url, timedelta(days=1)) == 4  # expired: 2 rows, idle: 2 rows
    left = db.execute("SELECT DISTINCT task_id FROM pgbroker.durable_step ORDER BY 1").fetchall()
    assert left == [("busy",), ("kept",), ("recent",)]
    assert prune(db_url, None) == 0

    # On a caller's connection, in the caller's transaction.
    with psycopg.connect(libpq_url(db_url)) as conn:
        assert prune(conn, 0) == 6
        conn.rollback()
    assert prune(db, 0) == 6
    assert db.execute("SELECT count(*) FROM pgbroker.durable_step").fetchone() == (0,)


def test_prune_without_the_table_says_what_to_run(empty_db_url: str) -> None:
    with pytest.raises(SchemaError, match="pgbroker migrate"):
        prune(empty_db_url, 60)


# --- configuration -------------------------------------------------------------------


def test_where_the_database_comes_from() -> None:
    pg = "postgresql://u:secret@h/db"
    other = "postgresql://u:secret@h/other"

    def config(**conf: Any) -> DurableConfig:
        app = Celery("c", set_as_current=False)
        app.conf.update(conf)
        return DurableConfig.from_app(app)

    c = config(broker_url=pg, broker_transport_options={"schema": "jobs"})
    assert (c.url, c.schema) == (pg, "jobs")
    c = config(
        broker_url="redis://localhost",
        result_backend=other,
        result_backend_transport_options={"schema": "results", "auto_migrate": False},
    )
    assert (c.url, c.schema, c.auto_migrate) == (other, "results", False)
    c = config(broker_url="amqp://", pgbroker_durable_url=pg)
    assert (c.url, c.schema) == (pg, "pgbroker")
    c = config(broker_url=f"{pg};{other}", pgbroker_durable_schema="steps")
    assert (c.url, c.schema) == (pg, "steps")
    c = config(broker_url=pg, pgbroker_durable_url=other)
    assert c.url == other  # an explicit setting wins
    assert config(broker_url=pg, pgbroker_durable_keep=timedelta(hours=2)).keep == 7200
    with pytest.raises(ConfigurationError, match="pgbroker_durable_url") as info:
        config(broker_url="redis://localhost", result_backend="redis://localhost")
    with pytest.raises(ConfigurationError, match=r"unsupported URL .*u:\*\*@h"):
        config(pgbroker_durable_url="postgresql+psycopg://u:secret@h/db")
    with pytest.raises(ConfigurationError, match="pgbroker_durable_keep"):
        config(broker_url=pg, pgbroker_durable_keep=-1)
    assert "secret" not in str(info.value)


def test_steps_auto_migrate_their_schema(empty_db_url: str) -> None:
    app = make_app(empty_db_url, broker_transport_options={"schema": "my steps"})

    @app.task(shared=False, bind=True, base=DurableTask)
    def task(self: DurableTask) -> int:
        return self.step("a", lambda: 41) + 1

    assert run(task, task_id="m") == 42
    with psycopg.connect(libpq_url(empty_db_url)) as conn:
        assert conn.execute('SELECT name FROM "my steps".durable_step').fetchall() == [("a",)]

    strict = make_app(empty_db_url, broker_transport_options={"auto_migrate": False})

    @strict.task(shared=False, bind=True, base=DurableTask)
    def other(self: DurableTask) -> int:
        return self.step("a", lambda: 1)

    with pytest.raises(SchemaError, match="pgbroker migrate"):
        run(other, task_id="n")


# --- fork ----------------------------------------------------------------------------


def test_fork_child_gets_its_own_pool(app: Celery, db: psycopg.Connection) -> None:
    @app.task(shared=False, bind=True, base=DurableTask)
    def task(self: DurableTask) -> int:
        return self.step("pid", os.getpid)

    parent = os.getpid()
    assert run(task, task_id="parent") == parent  # the parent's pool exists
    pid = os.fork()
    if pid == 0:  # child: use steps, then exit without cleanup
        code = 1
        try:
            ok = run(task, task_id="child") == os.getpid()
            ok = ok and run(task, task_id="parent") == parent  # replayed
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's pooled connection still works after the child exited.
    assert run(task, task_id="child") == pid
    assert run(task, task_id="again") == parent


def test_a_run_that_cannot_get_a_session_is_requeued_not_failed(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session terminated as the run begins (the chaos test's case): the
    body never ran, so with acks_late the message goes back to its queue
    instead of ending as a FAILURE result."""
    from celery.exceptions import Reject

    from pgbroker.durable import task as durable_task
    from pgbroker.errors import DatabaseUnavailable

    ran: list[str] = []

    @app.task(shared=False, bind=True, base=DurableTask, acks_late=True)
    def job(self: DurableTask) -> None:
        ran.append("body")

    def unreachable(*args: Any) -> Any:
        raise DatabaseUnavailable("the session ended as it started, retry in a moment")

    monkeypatch.setattr(durable_task, "begin_run", unreachable)
    job.push_request(id="requeued-1", is_eager=False, called_directly=False)
    try:
        with pytest.raises(Reject) as rejected:
            job()
    finally:
        job.pop_request()
    assert rejected.value.requeue is True
    assert ran == []
