"""Broker and result backend under Celery's other execution pools.

The prefork pool is covered by the other end-to-end tests; these run the
same app with the threads pool (tasks store results from several threads
at once) and with gevent (green threads; psycopg's waits go through the
patched selectors).
"""

from __future__ import annotations

import importlib.util

import pytest
from celery import chord, group

from tests.test_backend_e2e import T, database, running


@pytest.mark.parametrize(
    "pool",
    [
        "threads",
        pytest.param(
            "gevent",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("gevent") is None, reason="gevent not installed"
            ),
        ),
    ],
)
def test_results_groups_and_chords_under_pool(
    pool: str, pg_admin_url: str, template_db: str
) -> None:
    with database(pg_admin_url, template_db) as url, running(url, url, pool=pool) as (mod, _):
        assert mod.add.delay(2, 3).get(timeout=T) == 5
        assert group(mod.add.s(i, i) for i in range(20))().get(timeout=T) == [
            2 * i for i in range(20)
        ]
        assert chord(mod.add.s(i, 1) for i in range(10))(mod.xsum.s()).get(timeout=T) == 55
        failing = mod.fail.delay("boom")
        with pytest.raises(ValueError, match="boom"):
            failing.get(timeout=T)
