"""A coordinator call timeout that does not exceed the coordinator's wait for phase two
(1 s) makes such decisions time out and come back Unknown: the sidecar says so at start."""

from __future__ import annotations

import logging

import pytest

from tests.component.servers import closed_port


@pytest.mark.parametrize(("request_timeout", "warned"), [("1s", True), ("2s", False)])
async def test_a_short_coordinator_call_timeout_is_warned_about(
    sidecar_factory, caplog, request_timeout, warned
):
    caplog.set_level(logging.WARNING, logger="sidecar.control")
    await sidecar_factory(
        {
            "coordinator": {
                "endpoints": [f"http://127.0.0.1:{closed_port()}"],
                "timeouts": {"connect": "300ms", "request": request_timeout},
            }
        }
    )
    messages = [r.getMessage() for r in caplog.records if r.name == "sidecar.control"]
    assert any("coordinator.timeouts.request (1s)" in m for m in messages) is warned
