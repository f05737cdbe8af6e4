"""The outbound listener over real loopback sockets: the app → named upstreams.

Routing (README, "Outbound"): `/{upstream}/{rest}` prefix, a `Host:` equal to an upstream's name, or
an absolute-form request line (the app uses the sidecar as HTTP_PROXY). The XID is written
under each upstream's `xid_headers`; Host becomes the upstream's authority.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.component.servers import (
    Upstream,
    UpstreamFactory,
    error_of,
    get,
    request,
    sample,
)

XID = "10.0.0.1:8091:77"


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamFactory]:
    factory = UpstreamFactory()
    yield factory
    await factory.close()


async def two_upstreams(
    sidecar_factory: Any, upstream: UpstreamFactory
) -> tuple[Any, Upstream, Upstream, int]:
    orders = await upstream()
    stock = await upstream()
    sc = await sidecar_factory(
        {
            "upstreams": {
                "orders": {"url": orders.url + "/api/v1", "xid_headers": ["TX_XID", "X-GTS-XID"]},
                "stock": {"url": stock.url},
            }
        }
    )
    return sc, orders, stock, sc.ports["outbound"]


def authority(up: Upstream) -> str:
    return f"127.0.0.1:{up.port}"


# --- routing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/orders/items/1?x=1&y", "/api/v1/items/1?x=1&y"),
        ("/orders/", "/api/v1/"),
        ("/orders", "/api/v1/"),
        ("/orders?q=1", "/api/v1/?q=1"),
        ("/orders/a%2Fb/", "/api/v1/a%2Fb/"),
    ],
)
async def test_prefix_routing_maps_onto_the_upstream_base_path(
    sidecar_factory, upstream, path, target
):
    sc, orders, stock, port = await two_upstreams(sidecar_factory, upstream)
    resp = await request(port, get(path, f"Host: 127.0.0.1:{port}"))
    assert resp.status == 200
    (req,) = orders.requests
    assert req.target == target
    assert req.get_all("Host") == [authority(orders)]
    assert stock.requests == []


async def test_prefix_routing_without_a_base_path(sidecar_factory, upstream):
    sc, orders, stock, port = await two_upstreams(sidecar_factory, upstream)
    resp = await request(port, get("/stock/sku/9"))
    assert resp.status == 200
    assert stock.requests[0].target == "/sku/9"
    assert orders.requests == []


@pytest.mark.parametrize("host", ["orders", "ORDERS", "orders:80"])
async def test_host_routing_when_host_names_an_upstream(sidecar_factory, upstream, host):
    sc, orders, stock, port = await two_upstreams(sidecar_factory, upstream)
    # the path starts with another upstream's name: Host wins, the path is kept whole
    resp = await request(port, get("/stock/x?y=2", f"Host: {host}"))
    assert resp.status == 200
    (req,) = orders.requests
    assert req.target == "/api/v1/stock/x?y=2"
    assert req.get_all("Host") == [authority(orders)]
    assert stock.requests == []


async def test_absolute_form_routing_as_an_http_proxy(sidecar_factory, upstream):
    sc, orders, stock, port = await two_upstreams(sidecar_factory, upstream)
    resp = await request(port, b"GET http://orders/x/y?z=1 HTTP/1.1\r\nHost: orders\r\n\r\n")
    assert resp.status == 200
    (req,) = orders.requests
    assert req.target == "/api/v1/x/y?z=1"
    assert req.get_all("Host") == [authority(orders)]


async def test_absolute_form_by_upstream_authority(sidecar_factory, upstream):
    sc, orders, stock, port = await two_upstreams(sidecar_factory, upstream)
    resp = await request(
        port, f"GET http://{authority(stock)}/s HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    assert resp.status == 200
    assert stock.requests[0].target == "/s"


@pytest.mark.parametrize(
    "data",
    [
        get("/nowhere/x"),
        get("/"),
        b"GET http://nowhere/x HTTP/1.1\r\nHost: nowhere\r\n\r\n",
    ],
)
async def test_unknown_upstream_is_404_upstream_not_found(sidecar_factory, upstream, data):
    sc, orders, stock, port = await two_upstreams(sidecar_factory, upstream)
    resp = await request(port, data)
    assert resp.status == 404
    assert error_of(resp)["code"] == "UPSTREAM_NOT_FOUND"
    assert orders.requests == [] and stock.requests == []


async def test_request_body_and_method_are_forwarded(sidecar_factory, upstream):
    sc, orders, stock, port = await two_upstreams(sidecar_factory, upstream)
    resp = await request(port, get("/stock/put", method="PUT", body=b"payload"))
    assert resp.status == 200 and resp.body == b"PUT /put"
    (req,) = stock.requests
    assert req.method == "PUT" and req.body == b"payload"


# --- XID -----------------------------------------------------------------------------------------


async def test_xid_is_written_under_the_upstreams_xid_headers(sidecar_factory, upstream):
    sc, orders, stock, port = await two_upstreams(sidecar_factory, upstream)
    await request(port, get("/orders/a", f"XID: {XID}"))
    await request(port, get("/stock/b", f"X-GTS-XID: {XID}"))
    (to_orders,) = orders.requests
    assert to_orders.get_all("TX_XID") == [XID]
    assert to_orders.get_all("X-GTS-XID") == [XID]
    assert "xid" not in to_orders.names()
    (to_stock,) = stock.requests
    assert to_stock.get_all("XID") == [XID]  # no xid_headers: xid.app_headers
    assert "x-gts-xid" not in to_stock.names()


async def test_invalid_xid_on_outbound_is_refused_and_not_forwarded(sidecar_factory, upstream):
    sc, orders, stock, port = await two_upstreams(sidecar_factory, upstream)
    resp = await request(port, get("/orders/a", "TX_XID: 10.0.0.1:8091:"))
    assert resp.status == 400
    err = error_of(resp)
    assert err["code"] == "XID_INVALID" and err["header"] == "TX_XID"
    assert orders.requests == []
    assert (
        sample(sc, "gts_sidecar_xid_rejections_total", listener="outbound", reason="truncated") == 1
    )


async def test_no_xid_means_no_xid_header_upstream(sidecar_factory, upstream):
    sc, orders, stock, port = await two_upstreams(sidecar_factory, upstream)
    await request(port, get("/orders/a"))
    names = orders.requests[0].names()
    assert not {"xid", "tx_xid", "x-gts-xid"} & names


async def test_hop_by_hop_and_framing_headers_are_not_copied_outbound(sidecar_factory, upstream):
    sc, orders, stock, port = await two_upstreams(sidecar_factory, upstream)
    data = get(
        "/stock/x",
        "Connection: X-Secret",
        "X-Secret: 1",
        "Proxy-Connection: keep-alive",
        "Transfer_Encoding: chunked",
        method="POST",
        body=b"abc",
    )
    resp = await request(port, data)
    assert resp.status == 200
    (req,) = stock.requests
    assert not {"x-secret", "proxy-connection", "transfer_encoding", "connection"} & req.names()
    assert req.get_all("content-length") == ["3"] and req.body == b"abc"
