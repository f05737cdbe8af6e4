"""local_coordinator.outbox_max_items: a positive count, refused with its key path otherwise."""

from __future__ import annotations

import pytest

from sidecar import config
from sidecar.errors import ConfigError


def test_default_and_a_valid_value() -> None:
    assert config.parse({}, env={}).local_coordinator.outbox_max_items == 10_000
    cfg = config.parse({"local_coordinator": {"outbox_max_items": 5}}, env={})
    assert cfg.local_coordinator.outbox_max_items == 5


@pytest.mark.parametrize("value", [0, -1, "many", 1.5, 10**8])
def test_bad_values_name_the_key(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse({"local_coordinator": {"outbox_max_items": value}}, env={})
    assert any("local_coordinator.outbox_max_items" in p for p in info.value.problems)
