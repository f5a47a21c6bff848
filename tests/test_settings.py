"""Every setting of every feature (broker, result backend, beat, durable
steps) is checked when it is read: non-finite, negative, zero where zero
means nothing, wrongly typed values and garbage strings are refused with a
ConfigurationError that names the setting and what it accepts; the string
forms a configuration read from the environment gives ("false", "10") are
taken for what they say. No database needed."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from kombu import Connection

from pgbroker.durable.config import DurableConfig
from pgbroker.errors import ConfigurationError
from pgbroker.operations.beat import BeatConfig
from pgbroker.options import TransportOptions
from pgbroker.results.backend import BackendOptions

PG = "postgresql://app:pw@127.0.0.1:1/jobs"
NAN, INF = float("nan"), float("inf")


def _broker(name: str, value: Any) -> Any:
    return getattr(TransportOptions.from_mapping({name: value}), name)


def _backend(name: str, value: Any) -> Any:
    return getattr(BackendOptions.from_mapping({name: value}), name)


def _app(**conf: Any) -> Celery:
    app = Celery("settings", set_as_current=False)
    app.conf.update(broker_url=PG, **conf)
    return app


def _beat(setting: str, field: str) -> Callable[[str, Any], Any]:
    def read(name: str, value: Any) -> Any:
        return getattr(BeatConfig.from_app(_app(**{setting: value})), field)

    return read


def _durable(setting: str, field: str) -> Callable[[str, Any], Any]:
    def read(name: str, value: Any) -> Any:
        return getattr(DurableConfig.from_app(_app(**{setting: value})), field)

    return read


def _via_broker_options(config: Any, field: str) -> Callable[[str, Any], Any]:
    """beat and durable read auto_migrate/schema from the broker's options."""

    def read(name: str, value: Any) -> Any:
        app = _app(broker_transport_options={field: value})
        return getattr(config.from_app(app), field)

    return read


SECONDS_POSITIVE = "seconds > 0"
SECONDS_OR_ZERO = "seconds >= 0"

#: (what reads it, the name the error must give, the kind of value).
SETTINGS: list[tuple[str, Callable[[str, Any], Any], str, str]] = [
    ("broker", _broker, "schema", "schema"),
    ("broker", _broker, "auto_migrate", "flag"),
    ("broker", _broker, "sweep_interval", SECONDS_POSITIVE),
    ("broker", _broker, "polling_interval", SECONDS_POSITIVE),
    ("broker", _broker, "max_message_size", "bytes"),
    ("broker", _broker, "fast_recovery", "flag"),
    ("broker", _broker, "max_deliveries", "count or zero"),
    ("broker", _broker, "dedup_window", SECONDS_OR_ZERO),
    ("backend", _backend, "schema", "schema"),
    ("backend", _backend, "auto_migrate", "flag"),
    ("backend", _backend, "max_result_size", "bytes"),
    ("backend", _backend, "cleanup_interval", SECONDS_OR_ZERO),
    ("backend", _backend, "pool_size", "pool size"),
    ("beat", _beat("pgbroker_beat_catchup", "catchup"), "pgbroker_beat_catchup", SECONDS_OR_ZERO),
    ("beat", _beat("pgbroker_beat_schema", "schema"), "pgbroker_beat_schema", "schema"),
    ("beat", _via_broker_options(BeatConfig, "auto_migrate"), "auto_migrate", "flag"),
    ("beat", _via_broker_options(BeatConfig, "schema"), "schema", "schema"),
    (
        "durable",
        _durable("pgbroker_durable_keep", "keep"),
        "pgbroker_durable_keep",
        SECONDS_OR_ZERO,
    ),
    (
        "durable",
        _durable("pgbroker_durable_prune_interval", "prune_interval"),
        "pgbroker_durable_prune_interval",
        SECONDS_OR_ZERO,
    ),
    ("durable", _durable("pgbroker_durable_schema", "schema"), "pgbroker_durable_schema", "schema"),
    ("durable", _via_broker_options(DurableConfig, "auto_migrate"), "auto_migrate", "flag"),
]

_COMMON_BAD = [None, [], {}, object()]
BAD: dict[str, list[Any]] = {
    SECONDS_POSITIVE: [NAN, INF, -INF, -1, 0, 0.0, "nan", "inf", "10s", "", "-1", True, 1e12],
    SECONDS_OR_ZERO: [NAN, INF, -INF, -1, -0.5, "nan", "ten", "", True, False, 1e12],
    "bytes": [NAN, INF, -1, 0, 1.5, "1.5", "16MiB", True, 2**30, 10**20],
    "count or zero": [NAN, INF, -1, 2.5, "x", True, 2**31],
    "pool size": [NAN, INF, -1, 0, 1, 2.5, "four", True, 10**6],
    "flag": ["sometimes", "", "2", 1, 0, 1.0, NAN],
    "schema": ["", "x" * 64, "é" * 32, 5, "100%", "100%%", "a%sb", "nul\0"],
}
GOOD: dict[str, list[tuple[Any, Any]]] = {
    SECONDS_POSITIVE: [("10", 10.0), (" 2.5 ", 2.5), (3, 3.0), (timedelta(minutes=1), 60.0)],
    SECONDS_OR_ZERO: [("0", 0.0), (0, 0.0), ("10", 10.0), (timedelta(hours=1), 3600.0)],
    "bytes": [("1024", 1024), (2048.0, 2048), (2**30 - 1, 2**30 - 1)],
    "count or zero": [("0", 0), ("3", 3), (5, 5)],
    "pool size": [("2", 2), (10, 10)],
    "flag": [
        ("false", False),
        ("FALSE", False),
        ("0", False),
        ("no", False),
        ("off", False),
        ("true", True),
        ("Yes", True),
        ("1", True),
        (True, True),
        (False, False),
    ],
    "schema": [
        ("jobs", "jobs"),
        ("x" * 63, "x" * 63),
        ("é" * 31, "é" * 31),
        ('we"ird q', 'we"ird q'),
    ],
}


def _cases(table: dict[str, list[Any]]) -> list[Any]:
    return [
        pytest.param(read, name, kind, value, id=f"{feature}-{name}-{value!r:.20}")
        for feature, read, name, kind in SETTINGS
        for value in [*table[kind], *(_COMMON_BAD if table is BAD else [])]
        # A Celery setting set to None is a setting not set.
        if not (value is None and name.startswith("pgbroker_") and kind == "schema")
    ]


@pytest.mark.parametrize(("read", "name", "kind", "value"), _cases(BAD))
def test_bad_values_are_refused_naming_the_setting_and_the_range(
    read: Callable[[str, Any], Any], name: str, kind: str, value: Any
) -> None:
    with pytest.raises(ConfigurationError) as info:
        read(name, value)
    text = str(info.value)
    assert repr(name) in text or text.startswith(f"{name} must be"), text
    assert "must be" in text
    if kind == "flag":
        assert "True or False" in text
        assert "'false'" in text  # the strings it takes
    elif kind == "schema":
        assert "1 to 63 bytes" in text or "without '%'" in text
    else:
        assert "(accepted: " in text  # the range


@pytest.mark.parametrize(("read", "name", "kind", "case"), _cases(GOOD))
def test_good_values_and_their_string_forms(
    read: Callable[[str, Any], Any], name: str, kind: str, case: tuple[Any, Any]
) -> None:
    given, expected = case
    got = read(name, given)
    assert got == expected
    assert type(got) is type(expected)


def test_the_table_covers_every_setting() -> None:
    named = {(feature, name) for feature, _, name, _ in SETTINGS}
    for f in dataclasses.fields(TransportOptions):
        assert ("broker", f.name) in named
    for f in dataclasses.fields(BackendOptions):
        assert ("backend", f.name) in named


def test_messages() -> None:
    with pytest.raises(ConfigurationError) as info:
        TransportOptions.from_mapping({"sweep_interval": NAN})
    assert str(info.value) == (
        "broker_transport_options: 'sweep_interval' must be a number of seconds > 0, "
        "got nan (accepted: 0 < seconds <= 86400)"
    )
    with pytest.raises(ConfigurationError) as info:
        BackendOptions.from_mapping({"pool_size": "many"})
    assert str(info.value) == (
        "result_backend_transport_options: 'pool_size' must be a whole number >= 2, "
        "got 'many' (accepted: 2 to 1000)"
    )
    with pytest.raises(ConfigurationError) as info:
        DurableConfig.from_app(_app(pgbroker_durable_keep=INF))
    assert str(info.value).startswith(
        "pgbroker_durable_keep must be a number of seconds >= 0 (0: delete them when the "
        "task succeeds), got inf (accepted: 0 <= seconds <= "
    )


def test_backend_auto_migrate_string_false_is_false() -> None:
    # Used to be bool("false"): True, so migration ran.
    app = Celery("settings", set_as_current=False)
    app.conf.update(
        broker_url="memory://",
        result_backend=PG,
        result_backend_transport_options={"auto_migrate": "false"},
    )
    assert app.backend.options.auto_migrate is False
    assert DurableConfig.from_app(app).auto_migrate is False
    assert BeatConfig.from_app(app).auto_migrate is False


@pytest.mark.parametrize(
    ("name", "value"), [("sweep_interval", NAN), ("dedup_window", NAN), ("max_deliveries", INF)]
)
def test_kombu_connection_refuses_them(name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=f"'{name}' must be"):
        Connection(PG, transport_options={name: value}).connect()
