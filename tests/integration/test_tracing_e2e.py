"""Two sidecars and a standalone coordinator process on loopback.

- The stack of test_tcc_e2e, whose order app does not propagate the trace: a confirm in the
  caller's trace can only come from the coordinator, which stored the traceparent of the
  initiator's begin call.
- The same with spans exported by every process (the coordinator a real process, the two
  sidecars in the test's) to an OTLP/HTTP receiver in the test: the links cross processes.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from sidecar import tracing
from tests.component.otlp_receiver import OtlpReceiver
from tests.component.servers import wait_until
from tests.integration.test_coordinator_e2e import CoordinatorProcess
from tests.integration.test_tcc_e2e import Inventory, key_file, stack, wait_for  # noqa: F401

TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
APP_SPAN = "00f067aa0ba902b7"


async def test_the_coordinator_stores_the_trace_and_phase_two_carries_it(stack) -> None:  # noqa: F811
    coordinator, initiator, participant, inventory = stack
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"http://127.0.0.1:{initiator.ports['inbound']}/orders",
            headers={"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01"},
        ) as r:
            assert r.status == 201
            xid = r.headers["XID"]
    await wait_for(lambda: inventory.count()["/deduct/confirm"] == 1)
    (try_headers, confirm_headers) = [h for _, h, _ in inventory.calls]
    assert "traceparent" not in try_headers  # the app did not pass it on
    confirm = tracing.parse(confirm_headers["traceparent"])
    assert confirm is not None and confirm.trace_id == TRACE
    assert confirm_headers["XID"] == xid


@pytest.fixture
async def traced(tmp_path: Path, key_file: Path, sidecar_factory, aiohttp_server):  # noqa: F811
    receiver = OtlpReceiver()
    otlp = await aiohttp_server(receiver.app())
    tracing_cfg = {"otlp_endpoint": f"http://127.0.0.1:{otlp.port}"}
    coordinator = CoordinatorProcess(
        tmp_path, key_file, phase_two={"initial": "50ms", "max": "200ms"}
    )
    data = yaml.safe_load(coordinator.path.read_text())
    coordinator.path.write_text(yaml.safe_dump({**data, "tracing": tracing_cfg}))
    await coordinator.start()
    signing = {"key_id": "k1", "secret_file": str(key_file)}
    inventory = Inventory()
    inv_app = web.Application()
    inv_app.router.add_route("*", "/{tail:.*}", inventory.handle)
    inv_server = await aiohttp_server(inv_app)
    participant = await sidecar_factory(
        {
            "app": {"url": f"http://127.0.0.1:{inv_server.port}"},
            "coordinator": {"endpoints": [coordinator.url], "signing": signing},
            "tcc": [
                {
                    "resource": "inventory-deduct",
                    "try": {"method": "POST", "path": "/deduct"},
                    "confirm": {"method": "POST", "path": "/deduct/confirm"},
                    "cancel": {"method": "POST", "path": "/deduct/cancel"},
                }
            ],
            "tracing": tracing_cfg,
        }
    )
    ports: dict[str, int] = {}

    async def orders(request: web.Request) -> web.Response:
        async with aiohttp.ClientSession() as s:
            async with s.post(
                f"http://127.0.0.1:{ports['outbound']}/inventory/deduct",
                data=b"{}",
                headers={"XID": request.headers["XID"],
                         "traceparent": f"00-{TRACE}-{APP_SPAN}-01"},
            ) as r:  # fmt: skip
                assert r.status == 200
        return web.json_response({"order": 1}, status=201)

    order_app = web.Application()
    order_app.router.add_post("/orders", orders)
    order_server = await aiohttp_server(order_app)
    initiator = await sidecar_factory(
        {
            "app": {"url": f"http://127.0.0.1:{order_server.port}"},
            "coordinator": {"endpoints": [coordinator.url], "signing": signing},
            "upstreams": {"inventory": {"url": f"http://127.0.0.1:{participant.ports['inbound']}"}},
            "transactions": [
                {"match": {"method": "POST", "path": "/orders"}, "name": "order", "timeout": "30s"}
            ],
            "tracing": tracing_cfg,
        }
    )
    ports["outbound"] = initiator.ports["outbound"]
    yield initiator, inventory, receiver
    await coordinator.kill(15)


async def test_spans_link_across_the_sidecars_and_the_coordinator(traced) -> None:
    initiator, inventory, receiver = traced
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"http://127.0.0.1:{initiator.ports['inbound']}/orders",
            headers={"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01"},
        ) as r:
            assert r.status == 201
            xid = r.headers["XID"]

    def arrived() -> bool:
        return all(
            receiver.named(name)
            for name in (
                "gts start", "gts commit", "gts register", "gts transaction order",
                "gts register branch", "gts phase two commit", "gts confirm inventory-deduct",
            )
        )  # fmt: skip

    await wait_until(arrived, 20)
    one = {name: receiver.named(name)[0] for name in (
        "gts start", "gts commit", "gts register", "gts transaction order",
        "gts register branch", "gts phase two commit", "gts confirm inventory-deduct",
    )}  # fmt: skip
    assert {s.trace_id for s in one.values()} == {TRACE}
    roles = {name: s.resource.get("gts.role") for name, s in one.items()}
    assert roles["gts transaction order"] == roles["gts phase two commit"] == "coordinator"
    assert roles["gts start"] == roles["gts confirm inventory-deduct"] == "sidecar"
    # the initiator's calls are children of the request; the transaction of its begin call
    assert one["gts start"].parent_span_id == CLIENT_SPAN
    assert one["gts commit"].parent_span_id == CLIENT_SPAN
    assert one["gts transaction order"].parent_span_id == one["gts start"].span_id
    assert one["gts transaction order"].span_id == tracing.transaction_span_id(xid)
    # the participant's register call is a child of the try request, and the coordinator's
    # registration of that call
    assert one["gts register"].parent_span_id == APP_SPAN
    assert one["gts register branch"].parent_span_id == one["gts register"].span_id
    # phase two: the coordinator's callback under the transaction, the confirm under it
    assert one["gts phase two commit"].parent_span_id == one["gts transaction order"].span_id
    assert one["gts confirm inventory-deduct"].parent_span_id == one["gts phase two commit"].span_id
    (_, confirm_headers, _) = inventory.calls[-1]
    confirm = tracing.parse(confirm_headers["traceparent"])
    assert confirm is not None
    assert confirm.span_id == one["gts confirm inventory-deduct"].span_id
