"""Which PostgreSQL database and schema a Celery app's pgbroker features use.

Durable steps and the beat scheduler keep their tables next to the broker's:
``pgbroker_<feature>_url`` if set, else the app's broker URL if it is a
pgbroker URL, else its result backend URL; the schema from
``pgbroker_<feature>_schema``, else from the matching transport options,
else ``pgbroker``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pgbroker.errors import ConfigurationError
from pgbroker.options import flag, schema_name
from pgbroker.urls import SCHEMES, to_conninfo


@dataclasses.dataclass(frozen=True)
class AppDatabase:
    url: str = dataclasses.field(repr=False)  # holds the password
    schema: str
    auto_migrate: bool


def app_database(conf: Any, feature: str, needed_by: str) -> AppDatabase:
    """The database of ``feature`` ("durable", "beat") for an app's config."""
    broker = pgbroker_url(conf.broker_url)
    backend = pgbroker_url(conf.result_backend)
    url = conf.get(f"pgbroker_{feature}_url") or broker or backend
    if not url:
        raise ConfigurationError(
            f"{needed_by} needs a PostgreSQL database: use pgbroker as the broker "
            "(broker_url = 'postgresql://...') or as the result backend, or set "
            f"pgbroker_{feature}_url = 'postgresql://user:password@host/dbname'"
        )
    to_conninfo(url)  # validates the scheme, without a password in errors
    if broker:
        options = dict(conf.broker_transport_options or {})
    elif backend:
        options = dict(conf.get("result_backend_transport_options") or {})
    else:
        options = {}
    where = "broker_transport_options" if broker else "result_backend_transport_options"
    setting = f"pgbroker_{feature}_schema"
    if conf.get(setting) is not None:
        name = schema_name("", setting, conf.get(setting))
    else:
        name = schema_name(where, "schema", options.get("schema", "pgbroker"))
    # flag(): the string "false" means False, not True.
    auto_migrate = flag(where, "auto_migrate", options.get("auto_migrate", True))
    return AppDatabase(url, name, auto_migrate)


def pgbroker_url(value: Any) -> str | None:
    """``value`` if it is a pgbroker URL (the first one of a failover list)."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if not isinstance(value, str):
        return None
    value = value.split(";")[0].strip()
    return value if value.partition("://")[0].lower() in SCHEMES else None
