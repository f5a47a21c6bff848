"""Transport options: defaults, validation and messages (no database)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from pgbroker.errors import ConfigurationError
from pgbroker.options import KOMBU_OPTIONS, NOT_NEEDED, TransportOptions


def test_defaults() -> None:
    options = TransportOptions.from_mapping({})
    assert options == TransportOptions()
    assert options.schema == "pgbroker"
    assert options.auto_migrate is True
    assert options.sweep_interval == 10.0
    assert options.max_message_size == 16 * 1024 * 1024


def test_every_option_can_be_set() -> None:
    given = {
        "schema": "jobs",
        "auto_migrate": False,
        "sweep_interval": 0.5,
        "max_message_size": 1024,
        "polling_interval": 2,
        "max_deliveries": 3,
        "dedup_window": 60.0,
        "fast_recovery": False,
    }
    options = TransportOptions.from_mapping(given)
    assert dataclasses.asdict(options) == given
    # The test above must cover every option there is.
    assert set(given) == {f.name for f in dataclasses.fields(TransportOptions)}


def test_kombu_retry_options_are_left_to_kombu() -> None:
    # Producer.publish(retry=True, retry_policy=...) copies the policy into
    # transport_options, and Celery documents max_retries & co there: a
    # transport re-created after a lost connection must accept them.
    policy = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 1}
    options = TransportOptions.from_mapping({**policy, "sweep_interval": 1})
    assert options == TransportOptions(sweep_interval=1)
    assert set(policy) <= KOMBU_OPTIONS


def test_unknown_option_suggests_the_right_one() -> None:
    with pytest.raises(ConfigurationError) as info:
        TransportOptions.from_mapping({"sweep_intervall": 1})
    text = str(info.value)
    assert "unknown option 'sweep_intervall'" in text
    assert "Did you mean 'sweep_interval'?" in text
    # Lists what is accepted, so the user can fix it without the docs.
    for name in ("auto_migrate", "max_message_size", "polling_interval", "schema"):
        assert name in text


def test_unknown_option_without_close_match() -> None:
    with pytest.raises(ConfigurationError) as info:
        TransportOptions.from_mapping({"zzz": 1})
    assert "Did you mean" not in str(info.value)
    assert "unknown option 'zzz'" in str(info.value)


@pytest.mark.parametrize("name", sorted(NOT_NEEDED))
def test_options_of_other_transports_are_explained(name: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        TransportOptions.from_mapping({name: 1})
    text = str(info.value)
    assert repr(name) in text
    assert "remove it" in text
    assert "unknown option" not in text


def test_visibility_timeout_says_why_it_is_not_needed() -> None:
    with pytest.raises(ConfigurationError) as info:
        TransportOptions.from_mapping({"visibility_timeout": 3600})
    text = str(info.value)
    assert "Redis" in text
    assert "not needed" in text
    assert "sweep_interval" in text


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"schema": ""}, "'schema' must be a name of 1 to 63 bytes"),
        ({"schema": "x" * 64}, "'schema' must be a name of 1 to 63 bytes"),
        ({"schema": 5}, "'schema' must be a name"),
        ({"auto_migrate": "sometimes"}, "'auto_migrate' must be True or False, got 'sometimes'"),
        ({"sweep_interval": 0}, "'sweep_interval' must be a number of seconds > 0, got 0"),
        ({"sweep_interval": "5s"}, "'sweep_interval' must be a number of seconds > 0, got '5s'"),
        ({"polling_interval": -1}, "'polling_interval' must be a number of seconds > 0"),
        ({"max_message_size": 0}, "'max_message_size' must be a whole number of bytes > 0"),
        ({"max_message_size": 1.5}, "'max_message_size' must be a whole number of bytes > 0"),
        ({"max_message_size": True}, "'max_message_size' must be a whole number of bytes > 0"),
        ({"max_deliveries": -1}, "'max_deliveries' must be a whole number >= 0 (0: no limit)"),
        ({"max_deliveries": 2.5}, "'max_deliveries' must be a whole number >= 0"),
        ({"dedup_window": -1}, "'dedup_window' must be a number of seconds >= 0 (0: off)"),
        ({"dedup_window": "7d"}, "'dedup_window' must be a number of seconds >= 0"),
    ],
)
def test_bad_values_name_the_option_and_the_rule(given: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        TransportOptions.from_mapping(given)
    assert expected in str(info.value)
    assert str(info.value).startswith("broker_transport_options: ")


def test_schema_of_63_bytes_is_accepted() -> None:
    assert TransportOptions.from_mapping({"schema": "s" * 63}).schema == "s" * 63


def test_configuration_errors_are_not_retried_by_kombu() -> None:
    from pgbroker.broker.transport import Transport

    err = ConfigurationError("x")
    assert isinstance(err, ValueError)
    assert not isinstance(err, Transport.connection_errors)
    assert not isinstance(err, Transport.channel_errors)
