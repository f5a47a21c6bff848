"""Where an app's durable records live, and the connections to them.

:class:`DurableConfig` reads the Celery settings (``pgbroker_durable_url``,
``pgbroker_durable_schema``, ``pgbroker_durable_keep``,
``pgbroker_durable_prune_interval``: see :mod:`pgbroker.durable`). Each
process keeps one connection pool per (URL, schema) for durable tasks;
:func:`connection` is a connection or URL given by the caller (inspection,
pruning, events).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psycopg
import psycopg_pool

from pgbroker.appconfig import app_database
from pgbroker.database import pools
from pgbroker.database.sessions import connect
from pgbroker.errors import SchemaError
from pgbroker.options import TEN_YEARS
from pgbroker.options import seconds as check_seconds

logger = logging.getLogger("pgbroker.durable")

T = TypeVar("T")

DEFAULT_KEEP = 86400.0
DEFAULT_PRUNE_INTERVAL = 60.0
#: Connections per process for durable tasks: one per running task (it holds
#: the task's lock), plus a few for housekeeping.
POOL_MAX = 32


@dataclasses.dataclass(frozen=True)
class DurableConfig:
    url: str = dataclasses.field(repr=False)  # holds the password
    schema: str = "pgbroker"
    auto_migrate: bool = True
    keep: float = DEFAULT_KEEP
    prune_interval: float = DEFAULT_PRUNE_INTERVAL

    @classmethod
    def from_app(cls, app: Any) -> DurableConfig:
        """Where an app's durable steps live (see :mod:`pgbroker.durable`)."""
        conf = app.conf
        db = app_database(conf, "durable", "DurableTask")
        return cls(
            url=db.url,
            schema=db.schema,
            auto_migrate=db.auto_migrate,
            keep=keep_seconds(
                "pgbroker_durable_keep", conf.get("pgbroker_durable_keep", DEFAULT_KEEP)
            ),
            prune_interval=check_seconds(
                "",
                "pgbroker_durable_prune_interval",
                conf.get("pgbroker_durable_prune_interval", DEFAULT_PRUNE_INTERVAL),
                zero="0: leave pruning to pgbroker.durable.prune()",
            ),
        )


def keep_seconds(what: str, value: Any) -> float:
    """A keep time (``pgbroker_durable_keep``, ``durable_keep``), checked."""
    return check_seconds(
        "", what, value, zero="0: delete them when the task succeeds", maximum=TEN_YEARS
    )


def seconds(what: str, value: Any) -> float:
    """A duration in seconds (or a timedelta), checked; 0 allowed."""
    return check_seconds("", what, value, zero="0 allowed", maximum=TEN_YEARS)


# --- one pool per process -----------------------------------------------------------


def pool_for(config: DurableConfig) -> psycopg_pool.ConnectionPool:
    return pools.pool_for(
        config.url,
        config.schema,
        purpose="durable",
        auto_migrate=config.auto_migrate,
        max_size=POOL_MAX,
    )


def close_pools() -> None:
    """Close this process's durable-step connections (tests, shutdown)."""
    pools.close_pools("durable")


def run_pooled(config: DurableConfig, fn: Callable[[psycopg.Connection], T]) -> T:
    """Run ``fn`` on a pooled connection; once more if that one was dead. The
    queries run here are safe to repeat (see sql/durable.sql)."""
    return pools.run_pooled(lambda: pool_for(config), fn, "durable step")


# --- a connection or URL given by the caller ----------------------------------------


@contextlib.contextmanager
def connection(conn_or_url: psycopg.Connection | str) -> Iterator[psycopg.Connection]:
    if isinstance(conn_or_url, psycopg.Connection):
        yield conn_or_url
    else:
        with connect(conn_or_url, connect_timeout=10) as conn:
            yield conn


def missing_table(schema_name: str) -> SchemaError:
    return SchemaError(
        f"schema {schema_name!r} has no durable_step table: run `pgbroker migrate "
        f"--url URL{'' if schema_name == 'pgbroker' else ' --schema ' + schema_name}` "
        "(or start a worker with auto_migrate on)"
    )
