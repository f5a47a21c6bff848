"""The dashboard's task search stays fast on a million results: each filter's
plan reads an index in order and stops after a page (keyset paging), with no
sequential scan or sort of task_result (EXPLAIN, not the wall clock).

The table is filled cheaply with generate_series and ANALYZEd; run with
``-s`` to see each plan and the time of one search.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgbroker.dashboard import data
from pgbroker.database import queries
from pgbroker.operations import admin

ROWS = 1_000_000
NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def big(pg_admin_url: str, template_db: str) -> Iterator[psycopg.Connection]:
    """A database whose task_result holds ROWS results: 50 names, 6 states, 5
    queues, 20 workers, changes spread over 30 days."""
    import uuid

    from tests import pgserver

    name = f"pgbroker_plans_{uuid.uuid4().hex[:8]}"
    pgserver.create_database(pg_admin_url, name, template=template_db)
    try:
        with psycopg.connect(
            pgserver.libpq_url(pgserver.url_for(pg_admin_url, name)), autocommit=True
        ) as conn:
            # Faster to build the indexes once filled than to keep them up to
            # date row by row: the same definitions (pg_indexes) are dropped,
            # then made again.
            indexes = conn.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'pgbroker' "
                "AND tablename = 'task_result' AND indexname <> 'task_result_pkey'"
            ).fetchall()
            for index, _ in indexes:
                conn.execute(sql.SQL("DROP INDEX pgbroker.{}").format(sql.Identifier(index)))
            conn.execute(
                """
                INSERT INTO pgbroker.task_result (
                    task_id, state, name, worker, queue, retries, parent_id, root_id,
                    group_id, content_type, content_encoding, date_done, created_at, updated_at)
                SELECT md5(i::text), s.state, 'app.task_' || (i %% 50), 'w' || (i %% 20) || '@host',
                       'q' || (i %% 5), 0,
                       CASE WHEN i %% 10 = 0 THEN md5((i - 1)::text) END,
                       md5((i - i %% 10)::text),
                       CASE WHEN i %% 100 < 5 THEN 'g' || (i / 100) END,
                       'application/json', 'utf-8',
                       CASE WHEN s.state IN ('SUCCESS', 'FAILURE', 'REVOKED') THEN t.at END,
                       t.at, t.at
                FROM generate_series(1, %s) i
                CROSS JOIN LATERAL (
                    SELECT (ARRAY['SUCCESS', 'SUCCESS', 'SUCCESS', 'FAILURE', 'STARTED',
                                  'RETRY'])[1 + i %% 6] AS state) s
                CROSS JOIN LATERAL (
                    SELECT %s::timestamptz - (i * interval '2.592 seconds') AS at) t
                """,
                [ROWS, NOW],
            )
            conn.execute("SET maintenance_work_mem = '256MB'")
            for _, definition in indexes:
                conn.execute(definition)
            conn.execute("VACUUM ANALYZE pgbroker.task_result")
            yield conn
    finally:
        pgserver.drop_database(pg_admin_url, name)


def plan_of(conn: psycopg.Connection, name: str, params: dict[str, Any]) -> dict[str, Any]:
    query = queries.for_schema("pgbroker", "dashboard.sql")[name]
    explain = sql.SQL("EXPLAIN (FORMAT JSON) ") + query
    row = conn.execute(explain, params, prepare=False).fetchone()
    assert row is not None
    doc = row[0] if not isinstance(row[0], str) else json.loads(row[0])
    plan: dict[str, Any] = doc[0]["Plan"]
    return plan


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def describe(plan: dict[str, Any], depth: int = 0) -> str:
    line = "  " * depth + plan["Node Type"]
    if "Index Name" in plan:
        line += f" using {plan['Index Name']}"
    for key in ("Index Cond", "Filter"):
        if key in plan:
            line += f"\n{'  ' * depth}  {key}: {plan[key]}"
    line += f"  (rows={plan.get('Plan Rows')}, cost={plan.get('Total Cost')})"
    return "\n".join([line, *(describe(c, depth + 1) for c in plan.get("Plans", []))])


#: Filter -> the index its page is read from (see the test for the leeway).
CASES: dict[str, tuple[data.TaskFilter, str]] = {
    "none": (data.TaskFilter(), "task_result_recent"),
    "name": (data.TaskFilter(name="app.task_7"), "task_result_name_recent"),
    "state": (data.TaskFilter(state="failure"), "task_result_state_recent"),
    "queue": (data.TaskFilter(queue="q3"), "task_result_queue_recent"),
    "worker": (data.TaskFilter(worker="w11@host"), "task_result_worker_recent"),
    "task_id": (data.TaskFilter(task_id="c4ca4238a0b923820dcc509a6f75849b"), "task_result_pkey"),
    "time range": (
        data.TaskFilter(since=NOW - timedelta(days=3), until=NOW - timedelta(days=2)),
        "task_result_recent",
    ),
    "name and state": (
        data.TaskFilter(name="app.task_7", state="FAILURE"),
        "task_result_",  # either index of the two
    ),
    "name in a time range": (
        data.TaskFilter(name="app.task_7", since=NOW - timedelta(days=10)),
        "task_result_name_recent",
    ),
    "name wildcard": (data.TaskFilter(name="app.task_1*"), "task_result_recent"),
}


@pytest.mark.parametrize("page", ["first", "later"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_filter_reads_its_index_in_order(
    big: psycopg.Connection, case: str, page: str
) -> None:
    where, index = CASES[case]
    after = (
        data.Position(NOW - timedelta(days=5), "8f14e45fceea167a5a36dedd4bea2543")
        if page == "later"
        else None
    )
    plan = plan_of(big, "search_tasks", data.search_params(where, after, data.PAGE_SIZE))
    text = describe(plan)
    print(f"\n--- {case}, {page} page ---\n{text}")
    found = list(nodes(plan))
    kinds = {n["Node Type"] for n in found}
    assert "Seq Scan" not in kinds, text
    sorts = [n for n in found if n["Node Type"] in ("Sort", "Incremental Sort")]
    # (A task id is one row by its key: sorting that one row is free.)
    assert not sorts or (index == "task_result_pkey" and sorts[0]["Plan Rows"] == 1), text
    assert plan["Node Type"] == "Limit", text
    scans = [n for n in found if n["Node Type"] in ("Index Scan", "Index Only Scan")]
    # The filter's own index, or (for a value a fifth of the rows hold) the
    # time order's, filtered: both read in order and stop after a page.
    allowed = (index,) if index == "task_result_pkey" else (index, "task_result_recent")
    assert scans and all(n["Index Name"].startswith(allowed) for n in scans), text
    # The ORDER BY is the index order read backward (or one row by key).
    if index != "task_result_pkey":
        assert scans[0]["Scan Direction"] == "Backward", text

    started = time.perf_counter()
    result = big.execute(
        queries.for_schema("pgbroker", "dashboard.sql")["search_tasks"],
        data.search_params(where, after, data.PAGE_SIZE),
        prepare=False,
    ).fetchall()
    print(f"{len(result)} rows in {1000 * (time.perf_counter() - started):.1f} ms")


def test_the_pages_follow_one_another(big: psycopg.Connection) -> None:
    where = data.TaskFilter(name="app.task_7")
    first = data.search_tasks(big, "pgbroker", where)
    assert len(first.items) == data.PAGE_SIZE and first.next is not None
    second = data.search_tasks(big, "pgbroker", where, after=first.next)
    keys = [(t.updated_at, t.task_id) for t in first.items + second.items]
    assert keys == sorted(keys, reverse=True) and len(set(keys)) == 2 * data.PAGE_SIZE
    assert all(t.name == "app.task_7" for t in first.items + second.items)


def test_the_canvas_lookup_uses_indexes(big: psycopg.Connection) -> None:
    task_id = admin.show_task(big, "pgbroker", "d3d9446802a44259755d38e6d163e820").result
    assert task_id is not None  # md5('10'): parent md5('9'), root md5('10')
    me = task_id.task_id
    params = {
        "task_id": me,
        "root_id": task_id.root_id or me,
        "parent_id": task_id.parent_id or me,
        "group_id": task_id.group_id or me,
        "limit": data.CANVAS_LIMIT,
    }
    plan = plan_of(big, "canvas", params)
    text = describe(plan)
    print(f"\n--- canvas ---\n{text}")
    kinds = {n["Node Type"] for n in nodes(plan)}
    assert "Seq Scan" not in kinds and "BitmapOr" in kinds, text
