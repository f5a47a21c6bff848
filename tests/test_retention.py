"""Retention: ``pgbroker prune``, :func:`pgbroker.operations.retention.prune` and the
``pgbroker.prune`` beat task delete old history, and only what was asked."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from pgbroker.operations import admin, retention


def _count(db: psycopg.Connection, table: str, where: str = "true") -> int:
    row = db.execute(f"SELECT count(*) FROM pgbroker.{table} WHERE {where}").fetchone()
    assert row is not None
    return int(row[0])


def _history(db: psycopg.Connection) -> None:
    """Records aged 0 to 59 days: one per day in each history table."""
    db.execute(
        "INSERT INTO pgbroker.redelivery (at, reason, message_id, queue, delivery_count)"
        " SELECT now() - make_interval(days => i) - interval '1 minute', 'consumer died', i,"
        " 'q', 1 FROM generate_series(0, 59) i"
    )
    db.execute(
        "INSERT INTO pgbroker.dead_letter (died_at, reason, queue, published_at, exchange,"
        " routing_key, headers, properties, body)"
        " SELECT now() - make_interval(days => i) - interval '1 minute', 'rejected', 'q',"
        " now(), '', 'q', '{}', '{}', '\\x00' FROM generate_series(0, 59) i"
    )
    db.execute(
        "INSERT INTO pgbroker.task_result (task_id, state, content_type, content_encoding,"
        " date_done, updated_at)"
        " SELECT 't' || i, 'SUCCESS', 'application/json', 'utf-8',"
        " now() - make_interval(days => i) - interval '1 minute',"
        " now() - make_interval(days => i) - interval '1 minute'"
        " FROM generate_series(0, 59) i"
    )
    db.execute(
        "INSERT INTO pgbroker.group_result (group_id, result, content_type, content_encoding,"
        " date_done) SELECT 'g' || i, '\\x00', 'application/json', 'utf-8',"
        " now() - make_interval(days => i) - interval '1 minute' FROM generate_series(0, 59) i"
    )
    db.execute(
        "INSERT INTO pgbroker.chord (group_id, size, updated_at)"
        " SELECT 'c' || i, 1, now() - make_interval(days => i) - interval '1 minute'"
        " FROM generate_series(0, 59) i"
    )
    # Durable steps: tasks s0..s9 succeeded, keep time passed for s0..s4;
    # tasks f0..f9 failed, idle for 0..9 days (two steps each).
    db.execute(
        "INSERT INTO pgbroker.durable_step (task_id, step_index, name, state, expires_at)"
        " SELECT 's' || i, 0, 'a', 'done',"
        " CASE WHEN i < 5 THEN now() - interval '1 hour' ELSE now() + interval '1 hour' END"
        " FROM generate_series(0, 9) i"
    )
    db.execute(
        "INSERT INTO pgbroker.durable_step (task_id, step_index, name, state, updated_at)"
        " SELECT 'f' || i, s, 'a', 'failed', now() - make_interval(days => i)"
        "   - interval '1 minute'"
        " FROM generate_series(0, 9) i, generate_series(0, 1) s"
    )
    # Durable events, waits and runs (006), aged 0 to 9 days; the runs'
    # sessions are gone (backend pid 0 is never a session).
    db.execute(
        "INSERT INTO pgbroker.durable_event (name, content_type, content_encoding, sent_at)"
        " SELECT 'e' || i, 'application/json', 'utf-8',"
        " now() - make_interval(days => i) - interval '1 minute' FROM generate_series(0, 9) i"
    )
    db.execute(
        "INSERT INTO pgbroker.durable_wait (task_id, step_index, kind, name, since)"
        " SELECT 'w' || i, 0, 'event', 'e' || i,"
        " now() - make_interval(days => i) - interval '1 minute' FROM generate_series(0, 9) i"
    )
    db.execute(
        "INSERT INTO pgbroker.durable_run (task_id, run_id, backend_pid, started_at)"
        " SELECT 'r' || i, gen_random_uuid(), 0,"
        " now() - make_interval(days => i) - interval '1 minute' FROM generate_series(0, 9) i"
    )


def _by_target(report: retention.PruneReport) -> dict[str, tuple[int, int]]:
    return {i.target: (i.matched, i.deleted) for i in report.items}


def test_default_prunes_redeliveries_and_expired_steps_only(
    db_url: str, db: psycopg.Connection
) -> None:
    _history(db)
    with admin.open_connection(db_url, "pgbroker") as conn:
        report = retention.prune(conn, "pgbroker")
    # Redeliveries logged 7 days ago or more (days 7..59), succeeded tasks'
    # steps past their keep time; dead letters, results, idle steps stay.
    assert _by_target(report) == {"redelivery": (53, 53), "durable_step (expired)": (5, 5)}
    assert _count(db, "redelivery") == 7
    assert _count(db, "redelivery", "at < now() - interval '7 days'") == 0
    assert _count(db, "dead_letter") == 60
    assert _count(db, "task_result") == 60
    assert _count(db, "durable_step") == 5 + 20


def test_every_rule(db_url: str, db: psycopg.Connection) -> None:
    _history(db)
    policy = retention.Policy(
        redeliveries_older_than=timedelta(days=1),
        dead_letters_older_than=timedelta(days=30),
        results_older_than=timedelta(days=10),
        durable_idle_older_than=timedelta(days=3),
    )
    with admin.open_connection(db_url, "pgbroker") as conn:
        report = retention.prune(conn, "pgbroker", policy)
    assert _by_target(report) == {
        "redelivery": (59, 59),
        "dead_letter": (30, 30),
        "task_result": (50, 50),
        "group_result": (50, 50),
        "chord": (50, 50),
        "durable_step (expired)": (5, 5),
        "durable_step (idle)": (14, 14),  # tasks f3..f9, two steps each
        "durable_event": (7, 7),
        "durable_wait": (7, 7),
        "durable_run": (7, 7),
    }
    assert _count(db, "dead_letter", "died_at < now() - interval '30 days'") == 0
    assert _count(db, "dead_letter") == 30
    assert _count(db, "task_result") == 10
    assert _count(db, "durable_step", "task_id LIKE 'f%'") == 6
    assert report.deleted == 59 + 30 + 150 + 5 + 14 + 21
    assert _count(db, "durable_event") == _count(db, "durable_run") == 3


def test_dry_run_deletes_nothing(db_url: str, db: psycopg.Connection) -> None:
    _history(db)
    policy = retention.Policy(
        dead_letters_older_than=timedelta(days=30), durable_idle_older_than=timedelta(days=3)
    )
    with admin.open_connection(db_url, "pgbroker") as conn:
        dry = retention.prune(conn, "pgbroker", policy, dry_run=True)
        assert _by_target(dry) == {
            "redelivery": (53, 0),
            "dead_letter": (30, 0),
            "durable_step (expired)": (5, 0),
            "durable_step (idle)": (14, 0),
            "durable_event": (7, 0),
            "durable_wait": (7, 0),
            "durable_run": (7, 0),
        }
        assert (_count(db, "redelivery"), _count(db, "dead_letter")) == (60, 60)
        assert _count(db, "durable_step") == 30
        # The dry run's counts are what a real run deletes.
        real = retention.prune(conn, "pgbroker", policy)
    assert [(i.target, i.deleted) for i in real.items] == [(i.target, i.matched) for i in dry.items]


def test_deletes_in_batches_with_progress(db_url: str, db: psycopg.Connection) -> None:
    _history(db)
    seen: list[tuple[str, int, int]] = []
    statements: list[Any] = []
    with admin.open_connection(db_url, "pgbroker") as conn:
        real = conn.execute

        def counted(query: Any, *args: Any, **kwargs: Any) -> Any:
            statements.append(query)
            return real(query, *args, **kwargs)

        conn.execute = counted  # type: ignore[method-assign]
        retention.prune(
            conn,
            "pgbroker",
            retention.Policy(durable_expired=False),
            batch_size=10,
            progress=lambda *a: seen.append(a),
        )
    assert seen == [("redelivery", n, 53) for n in (10, 20, 30, 40, 50, 53)]
    # cutoff, count, 6 batches and the empty one that ends the loop.
    assert len(statements) == 1 + 1 + 6 + 1


def test_needs_autocommit(db_url: str) -> None:
    with (
        psycopg.connect("postgresql://" + db_url.partition("://")[2]) as conn,
        pytest.raises(ValueError, match="autocommit"),
    ):
        retention.prune(conn, "pgbroker")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7d", timedelta(days=7)),
        ("1h30m", timedelta(minutes=90)),
        (60, timedelta(minutes=1)),
        ("never", None),
        (None, None),
        (timedelta(hours=2), timedelta(hours=2)),
    ],
)
def test_age(value: Any, expected: timedelta | None) -> None:
    assert retention.age(value, "x") == expected


@pytest.mark.parametrize("value", ["soon", "0s", -5, True, [1]])
def test_bad_age_names_the_option(value: Any) -> None:
    with pytest.raises(ValueError, match="--dead-letters-older-than"):
        retention.age(value, "--dead-letters-older-than")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgbroker", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_prune(db_url: str, db: psycopg.Connection) -> None:
    _history(db)
    dry = _cli("prune", "--url", db_url, "--dead-letters-older-than", "30d", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would delete 88 rows" in dry.stdout  # 53 + 30 + 5
    assert "dry run" in dry.stdout
    assert _count(db, "dead_letter") == 60

    done = _cli(
        "prune",
        "--url",
        db_url,
        "--dead-letters-older-than",
        "30d",
        "--batch-size",
        "10",
        "--redeliveries-older-than",
        "never",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["dry_run"] is False
    assert {i["target"]: i["deleted"] for i in report["items"]} == {
        "dead_letter": 30,
        "durable_step (expired)": 5,
    }
    assert _count(db, "redelivery") == 60


def test_cli_prune_shows_progress_for_large_deletes(db_url: str, db: psycopg.Connection) -> None:
    _history(db)
    done = _cli("prune", "--url", db_url, "--redeliveries-older-than", "1s", "--batch-size", "25")
    assert done.returncode == 0, done.stderr
    assert "redelivery: deleted 25 of 60" in done.stderr
    assert "redelivery: deleted 60 of 60" in done.stderr
    assert "deleted 65 rows" in done.stdout


def test_cli_prune_rejects_a_bad_age(db_url: str) -> None:
    bad = _cli("prune", "--url", db_url, "--dead-letters-older-than", "a while")
    assert bad.returncode == 2
    assert "--dead-letters-older-than" in bad.stderr and "invalid duration" in bad.stderr


def test_beat_task(db_url: str, db: psycopg.Connection) -> None:
    """The pgbroker.prune task, run by Celery's task machinery (apply), on
    the app's own broker database."""
    from celery import Celery

    import pgbroker.operations.retention  # noqa: F401  (registers pgbroker.prune)

    _history(db)
    app = Celery("prune_test", broker=db_url, set_as_current=False)
    app.conf.imports = ["pgbroker.operations.retention"]
    app.loader.import_default_modules()
    task = app.tasks["pgbroker.prune"]
    result = task.apply(kwargs={"dead_letters_older_than": "30d", "results_older_than": 864000})
    assert result.successful(), result.traceback
    assert result.result == {
        "redelivery": 53,
        "dead_letter": 30,
        "task_result": 50,
        "group_result": 50,
        "chord": 50,
        "durable_step (expired)": 5,
    }
    bad = task.apply(kwargs={"redeliveries_older_than": "whenever"})
    assert bad.failed()
    assert "redeliveries_older_than" in str(bad.result)


def test_prune_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from pgbroker.cli import main as cli

    monkeypatch.setenv("PGBROKER_PRUNE_RESULTS_OLDER_THAN", "3d")
    monkeypatch.setenv("PGBROKER_PRUNE_BATCH_SIZE", "50")
    parser = cli.build_parser()
    args = parser.parse_args(["prune"])
    assert (args.results_older_than, args.batch_size) == ("3d", 50)
    assert parser.parse_args(["prune", "--batch-size", "9"]).batch_size == 9  # flag wins
    help_text = subprocess.run(
        [sys.executable, "-m", "pgbroker", "prune", "--help"], capture_output=True, text=True
    ).stdout
    assert "PGBROKER_PRUNE_DEAD_LETTERS_OLDER_THAN" in help_text
