"""Chaos: chains of durable tasks under SIGKILLed workers and killed sessions.

Two prefork workers (acks_late, task_reject_on_worker_lost) run many chains
of durable ``link`` tasks (tests/apps/chaos_app.py) while

* a killer SIGKILLs a random worker (its whole process group) at random
  moments and starts it again, and
* a session killer runs ``pg_terminate_backend`` on random pgbroker sessions:
  consumers (``backend_pid`` in ``pgbroker.consumer``) and the others
  (producers, result backend, durable-step pools: ``application_name``
  ``pgbroker:...``), except the test's own.

Then it counts, and asserts:

* every chain finished, and no task was lost (every link's steps committed);
* no duplicate hand-off: an AFTER INSERT trigger on ``pgbroker.message``
  logs each task message's (task_id, retries); two inserts of one pair means
  a message was published twice (a chain link handed off again by a re-run
  of its parent);
* no completed step ran twice: a step with ``conn=`` commits its effect
  with its checkpoint, so two effect rows for one step is a bug.

Steps without ``conn=`` that ran again (at least once by design), re-runs of
tasks, redeliveries and the time from each kill to the killed work resuming
are measured and printed on one summary line (``pytest -s`` shows it).

``PGBROKER_CHAOS_TERMINATE``: which sessions the session killer targets,
``all`` (default), ``consumers`` or ``none``.

Size: ``PGBROKER_CHAOS_CHAINS`` chains (default 30) of
``PGBROKER_CHAOS_LENGTH`` links (default 5). A larger run:
``PGBROKER_CHAOS_CHAINS=200 pytest -s tests/test_chaos.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import statistics
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import chain

from pgbroker.database.sessions import default_application_name
from tests.celery_helpers import Celery, celery_env, client_app, execute, wait_until

pytestmark = pytest.mark.slow

APP = "tests.apps.chaos_app"
CHAINS = int(os.environ.get("PGBROKER_CHAOS_CHAINS", "30"))
LENGTH = int(os.environ.get("PGBROKER_CHAOS_LENGTH", "5"))
WORKERS = 2
#: Seconds between two worker kills (after the last one is up again).
KILL_EVERY = (0.5, 2.5)
#: Seconds between two terminated sessions.
TERMINATE_EVERY = (0.3, 1.5)
#: Longest pretend work in each step, in seconds: a link takes about 0.2 s,
#: so the kills land while work is in progress.
STEP_WORK = "0.1"
#: Seconds to wait for every chain to finish.
DEADLINE = 90 + 0.5 * CHAINS * LENGTH
#: Seconds without any task event after which the run is taken as stuck.
STALL = 30
READY_TIMEOUT = 60
#: Which sessions the session killer terminates: "all" pgbroker sessions,
#: "consumers" only, or "none".
TERMINATE = os.environ.get("PGBROKER_CHAOS_TERMINATE", "all")

SETUP = [
    "CREATE TABLE chaos_effect (chain int, pos int, step text, pid int)",
    "CREATE TABLE chaos_loose (chain int, pos int, step text, pid int)",
    "CREATE TABLE chaos_event "
    "(id bigserial, task_id text, chain int, pos int, event text, pid int, at float8)",
    "CREATE TABLE chaos_publish (id bigserial, task_id text, retries text, queue text, "
    "at timestamptz NOT NULL DEFAULT clock_timestamp())",
    """
    CREATE FUNCTION chaos_log_publish() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO public.chaos_publish (task_id, retries, queue)
        VALUES (NEW.task_id, NEW.headers ->> 'retries', NEW.queue);
        RETURN NULL;
    END $$
    """,
    "CREATE TRIGGER chaos_log_publish AFTER INSERT ON pgbroker.message "
    "FOR EACH ROW WHEN (NEW.task_id IS NOT NULL) EXECUTE FUNCTION chaos_log_publish()",
]


@dataclasses.dataclass
class Kill:
    at: float
    worker: int
    pids: list[int]


class Chaos:
    """The workers, the worker killer and the session killer."""

    def __init__(self, db_url: str, log_dir: Path) -> None:
        self.db_url = db_url
        self.env = celery_env(db_url, CHAOS_STEP_WORK=STEP_WORK)
        self.log_dir = log_dir
        self.workers: list[Celery] = []
        self.retired: list[Celery] = []
        self.kills: list[Kill] = []
        self.terminated: Counter[str] = Counter()
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.generation = 0

    def start_worker(self, number: int) -> Celery:
        self.generation += 1
        args = ["worker", "--pool=prefork", "--concurrency=2", "-l", "info"]
        args += ["-n", f"chaos{number}@%h"]
        return Celery(f"w{number}-{self.generation}", APP, args, self.env, self.log_dir)

    def wait_ready(self, worker: Celery) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while "ready." not in worker.log():
            if worker.proc.poll() is not None:
                raise AssertionError(f"{worker.name} exited:\n{worker.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{worker.name} not ready:\n{worker.log()[-4000:]}")
            if self.stop.wait(0.05):
                return

    def start(self) -> None:
        self.workers = [self.start_worker(n) for n in range(WORKERS)]
        for w in self.workers:
            self.wait_ready(w)

    def unleash(self) -> None:
        for target in (self._killer, self._terminator):
            t = threading.Thread(target=self._guard, args=(target,), daemon=True)
            t.start()
            self.threads.append(t)

    def _guard(self, target: Any) -> None:
        try:
            target()
        except BaseException as exc:
            self.errors.append(exc)
            self.stop.set()

    def _killer(self) -> None:
        rng = random.Random()
        while not self.stop.wait(rng.uniform(*KILL_EVERY)):
            number = rng.randrange(WORKERS)
            worker = self.workers[number]
            pids = worker.group_pids()
            at = time.time()
            worker.kill_group()
            worker.stop()  # reaps it, closes its log
            self.kills.append(Kill(at, number, pids))
            self.retired.append(worker)
            self.workers[number] = replacement = self.start_worker(number)
            self.wait_ready(replacement)

    def _terminator(self) -> None:
        rng = random.Random()
        ours = default_application_name()
        with psycopg.connect(
            "postgresql://" + self.db_url.partition("://")[2], autocommit=True
        ) as conn:
            while not self.stop.wait(rng.uniform(*TERMINATE_EVERY)):
                if TERMINATE == "none":
                    continue
                kind = "consumer" if TERMINATE == "consumers" else rng.choice(["consumer", "other"])
                if kind == "consumer":
                    rows = conn.execute("SELECT backend_pid FROM pgbroker.consumer").fetchall()
                else:
                    rows = conn.execute(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND application_name LIKE 'pgbroker:%%' AND application_name <> %s "
                        "AND pid <> pg_backend_pid()",
                        [ours],
                    ).fetchall()
                if not rows:
                    continue
                (pid,) = rng.choice(rows)
                row = conn.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone()
                if row and row[0]:
                    self.terminated[kind] += 1

    def shutdown(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(READY_TIMEOUT + 30)
        for w in self.workers:
            w.stop(timeout=30)

    def logs(self) -> list[Celery]:
        return self.retired + self.workers


def wait_for_chains(db_url: str, chaos: Chaos) -> None:
    """Until every chain finished, or nothing happened for STALL seconds (a
    chain whose task failed never finishes), or DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    seen, since = -1, time.monotonic()
    while not chaos.errors and time.monotonic() < deadline:
        if finished_chains(db_url) == CHAINS:
            return
        events = count(db_url, "SELECT count(*) FROM chaos_event")
        if events != seen:
            seen, since = events, time.monotonic()
        elif time.monotonic() - since > STALL:
            return
        time.sleep(0.5)


def finished_chains(db_url: str) -> int:
    rows = execute(
        db_url,
        "SELECT count(DISTINCT chain) FROM chaos_effect WHERE pos = %s AND step = 's2'",
        (LENGTH - 1,),
    )
    return int(rows[0][0])


def resume_times(db_url: str, kills: list[Kill]) -> list[float]:
    """For each kill and each task the killed processes were running: the
    seconds from the kill to that task's next event in any process."""
    events = execute(db_url, "SELECT task_id, event, pid, at FROM chaos_event ORDER BY at, id")
    times = []
    for kill in kills:
        killed = set(kill.pids)
        last: dict[str, tuple[str, int]] = {}
        resumed: dict[str, float] = {}
        for task_id, event, pid, at in events:
            if at <= kill.at:
                last[task_id] = (event, pid)
            elif task_id not in resumed:
                resumed[task_id] = at
        for task_id, (event, pid) in last.items():
            if pid in killed and event != "done" and task_id in resumed:
                times.append(resumed[task_id] - kill.at)
    return times


def diagnosis(db_url: str) -> str:
    """What the database holds, for a run that did not finish."""
    queries = [
        "SELECT count(DISTINCT chain) AS finished FROM chaos_effect "
        f"WHERE pos = {LENGTH - 1} AND step = 's2'",
        "SELECT queue, state, consumer_id, delivery_count, task_name, task_id "
        "FROM pgbroker.message ORDER BY id LIMIT 20",
        "SELECT id, backend_pid, pid, started_at FROM pgbroker.consumer",
        "SELECT state, count(*) FROM pgbroker.task_result GROUP BY state",
        "SELECT task_id, right(traceback, 700) FROM pgbroker.task_result "
        "WHERE state = 'FAILURE' LIMIT 3",
        "SELECT reason, task_id FROM pgbroker.dead_letter LIMIT 5",
        "SELECT c, max(pos) FROM generate_series(0, 1000) c JOIN chaos_effect e "
        "ON e.chain = c GROUP BY c HAVING max(pos) < " + str(LENGTH - 1) + " LIMIT 10",
    ]
    out = []
    for q in queries:
        try:
            out.append(f"{q}\n  {execute(db_url, q)}")
        except psycopg.Error as exc:
            out.append(f"{q}\n  {exc}")
    return "\n".join(out)


LOST = (
    "SELECT DISTINCT task_id FROM chaos_publish p "
    "WHERE NOT EXISTS (SELECT 1 FROM pgbroker.task_result r "
    "WHERE r.task_id = p.task_id AND r.state IN ('SUCCESS', 'FAILURE')) "
    "AND NOT EXISTS (SELECT 1 FROM pgbroker.message m WHERE m.task_id = p.task_id) "
    "AND NOT EXISTS (SELECT 1 FROM pgbroker.dead_letter d WHERE d.task_id = p.task_id)"
)


#: Task ids published twice, and the task that published them (the link
#: before them in their chain).
DUPLICATES = (
    "SELECT d.task_id, (SELECT p.task_id FROM chaos_event e JOIN chaos_event p "
    "ON p.chain = e.chain AND p.pos = e.pos - 1 WHERE e.task_id = d.task_id LIMIT 1) "
    "FROM chaos_publish d GROUP BY d.task_id, d.retries HAVING count(*) > 1 LIMIT 3"
)


def report(db_url: str, chaos: Chaos) -> str:
    """The history of each lost task, and of a few tasks published twice
    and the tasks that published them."""
    tasks = [("lost", task_id) for (task_id,) in execute(db_url, LOST)]
    for twice, parent in execute(db_url, DUPLICATES):
        tasks += [("published twice", twice), ("the parent of", parent)]
    return "\n".join(history(db_url, chaos, what, task_id) for what, task_id in tasks)


def history(db_url: str, chaos: Chaos, what: str, task_id: str | None) -> str:
    """A task's publishes, runs, redeliveries and result, and the worker log
    lines that name it."""
    out = [f"--- {what} task {task_id}"]
    if task_id is not None:
        for q in (
            "SELECT id, retries, queue, at FROM chaos_publish WHERE task_id = %s ORDER BY id",
            "SELECT chain, pos, event, pid, at FROM chaos_event WHERE task_id = %s ORDER BY id",
            "SELECT at, reason, message_id, consumer_id, delivery_count "
            "FROM pgbroker.redelivery WHERE task_id = %s ORDER BY id",
            "SELECT state, date_done FROM pgbroker.task_result WHERE task_id = %s",
        ):
            out.append(f"{q}\n  {execute(db_url, q, (task_id,))}")
        for w in chaos.logs():
            out.extend(f"{w.name}: {line}" for line in w.log().splitlines() if task_id in line)
    return "\n".join(out)


def count(db_url: str, query: str) -> int:
    return int(execute(db_url, query)[0][0] or 0)


@pytest.mark.timeout(DEADLINE + 240)
def test_chains_survive_killed_workers_and_sessions(
    db_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    for statement in SETUP:
        db.execute(statement)
    chaos = Chaos(db_url, tmp_path)
    started = time.monotonic()
    try:
        with client_app(APP, db_url) as tasks:
            chaos.start()
            for c in range(CHAINS):
                chain(tasks.link.si(c, pos) for pos in range(LENGTH)).apply_async()
            chaos.unleash()
            wait_for_chains(db_url, chaos)
            chaos.stop.set()
            # Let re-runs and duplicates still queued finish before counting.
            with contextlib.suppress(AssertionError):
                wait_until(
                    lambda: (
                        count(
                            db_url,
                            "SELECT count(*) FROM pgbroker.message WHERE task_id IS NOT NULL",
                        )
                        == 0
                    ),
                    30,
                    "the task queue to drain",
                    interval=0.5,
                )
    except BaseException:
        for w in chaos.logs()[-4:]:
            print(f"--- {w.name} log, last 3000 characters ---\n{w.log()[-3000:]}")
        raise
    finally:
        chaos.shutdown()
    if finished_chains(db_url) < CHAINS:
        print(diagnosis(db_url))
    elapsed = time.monotonic() - started
    assert not chaos.errors, chaos.errors

    tasks_total = CHAINS * LENGTH
    finished = finished_chains(db_url)
    # A lost task: published, and neither finished (SUCCESS or FAILURE
    # stored) nor still queued or dead-lettered; or finished with SUCCESS
    # without the effects of its conn= steps.
    lost = count(db_url, f"SELECT count(*) FROM ({LOST}) lost") + count(
        db_url,
        "SELECT count(*) FROM pgbroker.task_result r WHERE r.state = 'SUCCESS' "
        "AND (SELECT count(DISTINCT e.step) FROM chaos_effect e "
        "JOIN (SELECT DISTINCT chain, pos FROM chaos_event v WHERE v.task_id = r.task_id) t "
        "ON e.chain = t.chain AND e.pos = t.pos) < 2",
    )
    duplicate_pairs = count(
        db_url,
        "SELECT count(*) FROM (SELECT 1 FROM chaos_publish GROUP BY task_id, retries "
        "HAVING count(*) > 1) d",
    )
    extra_inserts = count(
        db_url,
        "SELECT sum(n - 1) FROM (SELECT count(*) n FROM chaos_publish GROUP BY task_id, retries) d",
    )
    steps_twice = count(
        db_url,
        "SELECT count(*) FROM (SELECT 1 FROM chaos_effect GROUP BY chain, pos, step "
        "HAVING count(*) > 1) d",
    )
    loose_reruns = count(
        db_url,
        "SELECT sum(n - 1) FROM (SELECT count(*) n FROM chaos_loose GROUP BY chain, pos) d",
    )
    runs = count(db_url, "SELECT count(*) FROM chaos_event WHERE event = 'run'")
    retried = count(db_url, "SELECT count(*) FROM chaos_publish WHERE retries <> '0'")
    failed = count(db_url, "SELECT count(*) FROM pgbroker.task_result WHERE state = 'FAILURE'")
    dead = count(db_url, "SELECT count(*) FROM pgbroker.dead_letter")
    redelivered = count(db_url, "SELECT count(*) FROM pgbroker.redelivery")
    left = count(db_url, "SELECT count(*) FROM pgbroker.message WHERE task_id IS NOT NULL")
    errors = sum(w.log().count("ERROR/") for w in chaos.logs())
    resumes = resume_times(db_url, chaos.kills)
    median = f"{statistics.median(resumes):.2f} s" if resumes else "n/a"
    worst = f"{max(resumes):.2f} s" if resumes else "n/a"
    summary = (
        f"chaos: {CHAINS} chains x {LENGTH} links in {elapsed:.0f} s "
        f"(sessions terminated: {TERMINATE}); "
        f"chains finished {finished}/{CHAINS}; lost tasks {lost}; "
        f"duplicate hand-offs {duplicate_pairs} ({extra_inserts} extra inserts); "
        f"completed steps run twice {steps_twice}; non-conn steps re-run {loose_reruns}; "
        f"task runs {runs} for {tasks_total} tasks; task retries {retried}; "
        f"FAILURE results {failed}; dead letters {dead}; redeliveries {redelivered}; "
        f"task messages left {left}; worker ERROR log lines {errors}; "
        f"worker kills {len(chaos.kills)}; sessions terminated "
        f"{sum(chaos.terminated.values())} ({chaos.terminated['consumer']} consumers); "
        f"kill -> killed work resumed: median {median}, max {worst} (n={len(resumes)})"
    )
    print(summary)
    if lost or duplicate_pairs:
        summary += "\n" + report(db_url, chaos)
    assert {
        "unfinished chains": CHAINS - finished,
        "lost tasks": lost,
        "duplicate hand-offs": duplicate_pairs,
        "completed steps run twice": steps_twice,
    } == {
        "unfinished chains": 0,
        "lost tasks": 0,
        "duplicate hand-offs": 0,
        "completed steps run twice": 0,
    }, summary
    assert chaos.kills, summary  # the chaos did happen
