"""An HTTP/2 upgrade offer (`Connection: Upgrade, HTTP2-Settings` + `Upgrade: h2c`) on a
plain-text HTTP/1.1 request is ignored and the request served in HTTP/1.1, as a server may
(RFC 9110 §7.8) and as nginx and Envoy do. Java's HttpClient sends the offer on the first
request of every connection by default, with its body (Spring's RestClient: chunked), and
curl --http2 does too: refusing it (501) would refuse every such client. The offer's body
and the requests pipelined after it must arrive whole, and neither Upgrade nor HTTP2-Settings
may reach the app. WebSocket upgrades stay refused (test_limits.py).
"""

from __future__ import annotations

import asyncio
import shutil
from typing import Any

import pytest

from tests.component.servers import Client, UpstreamFactory

OFFER = (
    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
)


async def _sidecar(sidecar_factory: Any, upstream: UpstreamFactory) -> tuple[Any, Any]:
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    return sc, app


def _no_offer_reached(app: Any) -> None:
    for req in app.requests:
        assert not {"upgrade", "http2-settings"} & req.names(), req.raw_head
        assert "upgrade" not in (req.get("connection") or "").lower()


async def test_a_get_offering_h2c_is_answered_in_http11_and_the_next_request_follows(
    sidecar_factory, upstream
):
    sc, app = await _sidecar(sidecar_factory, upstream)
    async with await Client.connect(sc.ports["inbound"]) as client:
        # the offer and a pipelined request in one write
        await client.send(
            b"GET /first HTTP/1.1\r\nHost: t\r\n" + OFFER + b"\r\n"
            b"GET /second HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        first = await client.response()
        second = await client.response()
    assert (first.status, second.status) == (200, 200)
    assert first.raw_head.startswith(b"HTTP/1.1 200")
    assert b"upgrade" not in first.raw_head.lower()
    assert [r.target for r in app.requests] == ["/first", "/second"]
    _no_offer_reached(app)


async def test_a_post_offering_h2c_delivers_its_content_length_body_sent_apart(
    sidecar_factory, upstream
):
    sc, app = await _sidecar(sidecar_factory, upstream)
    async with await Client.connect(sc.ports["inbound"]) as client:
        await client.send(
            b"POST /orders HTTP/1.1\r\nHost: t\r\n" + OFFER + b"Content-Length: 11\r\n\r\n"
        )
        await client.send(b"hello")
        await client.send(b" world" + b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n")
        first = await client.response()
        second = await client.response()
    assert (first.status, second.status) == (200, 200)
    assert [(r.method, r.target, r.body) for r in app.requests] == [
        ("POST", "/orders", b"hello world"),
        ("GET", "/after", b""),
    ]
    _no_offer_reached(app)


async def test_a_chunked_post_offering_h2c_delivers_its_body_and_keeps_the_connection(
    sidecar_factory, upstream
):
    """What Spring's RestClient sends (httptools#124: uvicorn lost this body)."""
    sc, app = await _sidecar(sidecar_factory, upstream)
    async with await Client.connect(sc.ports["inbound"]) as client:
        await client.send(
            b"POST /pay HTTP/1.1\r\nHost: t\r\n"
            + OFFER
            + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc"
        )
        await client.send(b"\r\n4\r\ndefg\r\n0\r\n")
        await client.send(b"\r\nPOST /again HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nok")
        first = await client.response()
        second = await client.response()
    assert (first.status, second.status) == (200, 200)
    assert [(r.target, r.body) for r in app.requests] == [("/pay", b"abcdefg"), ("/again", b"ok")]
    _no_offer_reached(app)


async def test_the_outbound_listener_ignores_the_offer_too(sidecar_factory, upstream):
    app = await upstream()
    sc = await sidecar_factory({"upstreams": {"inventory": {"url": app.url}}})
    async with await Client.connect(sc.ports["outbound"]) as client:
        await client.send(
            b"POST /inventory/reserve HTTP/1.1\r\nHost: inventory\r\n"
            + OFFER
            + b"Content-Length: 2\r\n\r\nhi"
        )
        resp = await client.response()
    assert resp.status == 200
    assert [(r.target, r.body) for r in app.requests] == [("/inventory/reserve", b"hi")]
    _no_offer_reached(app)


@pytest.mark.parametrize("upgrade", [b"h2c, websocket", b"websocket, h2c"])
async def test_an_offer_that_is_not_only_h2c_is_still_refused(sidecar_factory, upstream, upgrade):
    sc, app = await _sidecar(sidecar_factory, upstream)
    async with await Client.connect(sc.ports["inbound"]) as client:
        await client.send(
            b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: "
            + upgrade
            + b"\r\n\r\n"
        )
        resp = await client.response()
    assert resp.status == 501
    assert app.requests == []


async def test_curl_http2_on_a_plain_text_url_gets_its_answer(sidecar_factory, upstream):
    """`curl --http2 http://...` (what a user tries first) offers the upgrade."""
    curl = shutil.which("curl")
    assert curl is not None
    sc, app = await _sidecar(sidecar_factory, upstream)
    proc = await asyncio.create_subprocess_exec(
        curl, "-s", "-o", "/dev/null", "-w", "%{http_code} %{http_version}", "--http2",
        "-d", "x=1", f"http://127.0.0.1:{sc.ports['inbound']}/form",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert out == b"200 1.1"
    assert [r.body for r in app.requests] == [b"x=1"]
    _no_offer_reached(app)
