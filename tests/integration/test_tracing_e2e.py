"""Two sidecars and a standalone coordinator process (the stack of test_tcc_e2e): the order
app does not propagate the trace to the participant, so a confirm in the caller's trace can
only come from the coordinator, which stored the traceparent of the initiator's begin call."""

from __future__ import annotations

import aiohttp

from sidecar import tracing
from tests.integration.test_tcc_e2e import key_file, stack, wait_for  # noqa: F401

TRACE = "0af7651916cd43dd8448eb211c80319c"


async def test_the_coordinator_stores_the_trace_and_phase_two_carries_it(stack) -> None:  # noqa: F811
    coordinator, initiator, participant, inventory = stack
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"http://127.0.0.1:{initiator.ports['inbound']}/orders",
            headers={"traceparent": f"00-{TRACE}-b7ad6b7169203331-01"},
        ) as r:
            assert r.status == 201
            xid = r.headers["XID"]
    await wait_for(lambda: inventory.count()["/deduct/confirm"] == 1)
    (try_headers, confirm_headers) = [h for _, h, _ in inventory.calls]
    assert "traceparent" not in try_headers  # the app did not pass it on
    confirm = tracing.parse(confirm_headers["traceparent"])
    assert confirm is not None and confirm.trace_id == TRACE
    assert confirm_headers["XID"] == xid
