"""A call made for a transaction never outlives it: an outbound call carrying the XID of a
transaction this sidecar began gets min(the upstream's total timeout, the transaction's time
left), and its 504 says which ran out."""

from __future__ import annotations

import aiohttp

from tests.component.servers import error_of, get, request, stall_forever


async def test_an_outbound_call_for_a_transaction_ends_with_the_transaction(
    sidecar_factory, upstream
):
    slow = await upstream(stall_forever)
    sc = await sidecar_factory(
        {
            "coordinator": {"timeouts": {"connect": "100ms", "request": "200ms"}},
            "upstreams": {
                "inventory": {
                    "url": slow.url,
                    "timeouts": {"connect": "1s", "response_header": "50s", "total": "60s"},
                }
            },
        }
    )
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"http://127.0.0.1:{sc.ports['api']}/v1/transactions",
            json={"name": "order", "timeout": "1s"},
        ) as r:
            xid = (await r.json())["xid"]
    # (without the clamp this waits for the upstream's 60 s total and the read times out)
    resp = await request(sc.ports["outbound"], get("/inventory/items/1", f"XID: {xid}"), timeout=10)
    assert resp.status == 504
    err = error_of(resp)
    assert err["code"] == "UPSTREAM_TIMEOUT"
    assert "ran out of time" in err["message"] and xid in err["message"]


async def test_a_call_without_a_known_transaction_keeps_its_own_timeout(sidecar_factory, upstream):
    quick = await upstream()
    sc = await sidecar_factory({"upstreams": {"inventory": {"url": quick.url}}})
    resp = await request(
        sc.ports["outbound"], get("/inventory/items/1", "XID: 10.0.0.9:8091:77"), timeout=10
    )
    assert resp.status == 200
