"""locks.backend: coordinator (the coordinator cluster's global locks) needs
coordinator.endpoints, and is refused with the key path without them."""

from __future__ import annotations

import pytest

from sidecar import config
from sidecar.errors import ConfigError


def test_coordinator_locks_with_endpoints() -> None:
    cfg = config.parse(
        {
            "locks": {"backend": "coordinator"},
            "coordinator": {"endpoints": ["http://gts-coordinator:17020"]},
        },
        env={},
    )
    assert cfg.locks.backend == "coordinator"


def test_coordinator_locks_without_endpoints_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        config.parse({"locks": {"backend": "coordinator"}}, env={})
    assert any(
        "locks.backend" in p and "coordinator.endpoints" in p for p in info.value.problems
    ), info.value.problems


def test_other_backends_still_checked() -> None:
    with pytest.raises(ConfigError) as info:
        config.parse({"locks": {"backend": "coordinators"}}, env={})
    assert any("locks.backend" in p for p in info.value.problems), info.value.problems
