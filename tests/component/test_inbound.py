"""The inbound listener over real loopback sockets: pod-facing clients → the app (`app.url`).

The app is `servers.Upstream`, a raw HTTP/1.1 server with its own strict framing parser that
records every request it gets, so each test can say exactly what reached the app, or that
nothing did.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.component.servers import (
    Client,
    Received,
    Reply,
    UpstreamFactory,
    closed_port,
    error_of,
    get,
    request,
    sample,
)

GOOD_XID = "10.0.0.1:8091:2001"


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamFactory]:
    factory = UpstreamFactory()
    yield factory
    await factory.close()


async def start(sidecar_factory: Any, upstream: UpstreamFactory, handler: Any = None, **cfg: Any):
    app = await (upstream(handler) if handler else upstream())
    sc = await sidecar_factory({"app": {"url": app.url}, **cfg})
    return sc, app, sc.ports["inbound"]


# --- XID -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["XID", "X-GTS-XID", "TX_XID", "x-gts-xid", "tx_xid"])
async def test_xid_from_any_alias_reaches_the_app_under_the_app_header_only(
    sidecar_factory, upstream, alias
):
    sc, app, port = await start(sidecar_factory, upstream)
    resp = await request(port, get("/pay", f"{alias}: {GOOD_XID}"))
    assert resp.status == 200
    (req,) = app.requests
    assert req.get_all("XID") == [GOOD_XID]
    assert "x-gts-xid" not in req.names()
    assert "tx_xid" not in req.names()


async def test_xid_written_under_every_configured_app_header(sidecar_factory, upstream):
    sc, app, port = await start(
        sidecar_factory, upstream, xid={"app_headers": ["X-GTS-XID", "X-Trace-Xid"]}
    )
    resp = await request(port, get("/", f"TX_XID: {GOOD_XID}"))
    assert resp.status == 200
    (req,) = app.requests
    assert req.get_all("X-GTS-XID") == [GOOD_XID]
    assert req.get_all("X-Trace-Xid") == [GOOD_XID]
    assert "xid" not in req.names() and "tx_xid" not in req.names()


async def test_two_aliases_that_agree_are_accepted(sidecar_factory, upstream):
    sc, app, port = await start(sidecar_factory, upstream)
    resp = await request(port, get("/", f"XID: {GOOD_XID}", f"X-GTS-XID: {GOOD_XID}"))
    assert resp.status == 200
    assert app.requests[0].get_all("XID") == [GOOD_XID]


BAD_XIDS = [
    # (headers, reason label, header named in the error)
    (["XID: 10.0.0.1:8091:"], "truncated", "XID"),
    (["X-GTS-XID: 10.0.0.1:8091"], "truncated", "X-GTS-XID"),
    (["TX_XID: a:b:c:d"], "format", "TX_XID"),
    (["XID: 10.0.0.1:99999:1"], "port", "XID"),
    (["XID: 10.0.0.1:8091:123456789012345678901"], "txid", "XID"),
    (["XID: 10.0.0.1\t:8091:1"], "control", "XID"),
    (["XID: " + "a" * 60 + "." + "b" * 60 + ".example:8091:1"], "length", "XID"),
    ([f"XID: {GOOD_XID}", "X-GTS-XID: 10.0.0.2:8091:2001"], "conflict", "X-GTS-XID"),
    ([f"XID: {GOOD_XID}", f"XID: {GOOD_XID}"], "repeated", "XID"),
    (
        [f"X-GTS-XID: {GOOD_XID}", f"XID: {GOOD_XID}", f"x-gts-xid: {GOOD_XID}"],
        "repeated",
        "x-gts-xid",
    ),
]


@pytest.mark.parametrize(("headers", "reason", "header"), BAD_XIDS)
async def test_bad_xid_is_refused_with_400_and_never_reaches_the_app(
    sidecar_factory, upstream, headers, reason, header
):
    sc, app, port = await start(sidecar_factory, upstream)
    async with await Client.connect(port) as client:
        await client.send(get("/pay", *headers))
        resp = await client.response()
        assert resp.status == 400
        err = error_of(resp)
        assert err["code"] == "XID_INVALID"
        assert err["header"].lower() == header.lower()
        assert (
            sample(sc, "gts_sidecar_xid_rejections_total", listener="inbound", reason=reason) == 1
        )
        # the connection is still usable (a bodiless request was refused cleanly)
        await client.send(get("/next"))
        assert (await client.response()).status == 200
    assert [r.target for r in app.requests] == ["/next"]


async def test_xid_rejections_are_exported_on_the_admin_metrics_endpoint(sidecar_factory, upstream):
    sc, app, port = await start(sidecar_factory, upstream)
    for _ in range(2):
        resp = await request(port, get("/", "XID: 10.0.0.1:8091:"))
        assert resp.status == 400
    metrics = await request(sc.ports["admin"], get("/metrics"))
    line = 'gts_sidecar_xid_rejections_total{listener="inbound",reason="truncated"} 2.0'
    assert line in metrics.body.decode()
    assert app.requests == []


async def test_bad_xid_on_a_post_is_refused_without_forwarding_the_body(sidecar_factory, upstream):
    sc, app, port = await start(sidecar_factory, upstream)
    resp = await request(port, get("/", "XID: nope", method="POST", body=b"x" * 1000))
    assert resp.status == 400
    assert error_of(resp)["code"] == "XID_INVALID"
    assert app.requests == []


async def test_request_without_xid_passes_untouched(sidecar_factory, upstream):
    sc, app, port = await start(sidecar_factory, upstream)
    resp = await request(port, get("/a/b?c=d&e", "Accept: */*", "X-Custom: 1"))
    assert resp.status == 200
    (req,) = app.requests
    assert req.method == "GET" and req.target == "/a/b?c=d&e"
    assert "xid" not in req.names()
    assert req.get("X-Custom") == "1" and req.get("Accept") == "*/*"
    assert req.get("Host") == "test"


# --- framing and headers -------------------------------------------------------------------------


async def test_content_length_is_recomputed_and_underscore_spellings_dropped(
    sidecar_factory, upstream
):
    sc, app, port = await start(sidecar_factory, upstream)
    data = get(
        "/",
        "content_length: 999",
        "transfer_encoding: chunked",
        "Content_Length: 1",
        method="POST",
        body=b"hello",
    )
    resp = await request(port, data)
    assert resp.status == 200
    (req,) = app.requests
    assert req.framing == "content-length"
    assert req.get_all("content-length") == ["5"]
    assert not {"content_length", "transfer_encoding"} & req.names()
    assert req.body == b"hello"


async def test_chunked_request_body_is_reframed_and_trailers_dropped(sidecar_factory, upstream):
    sc, app, port = await start(sidecar_factory, upstream)
    data = (
        b"POST /up HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    resp = await request(port, data)
    assert resp.status == 200
    (req,) = app.requests
    assert req.framing == "chunked"
    assert req.body == b"hello world"
    assert req.trailers == []
    assert req.get_all("transfer-encoding") == ["chunked"]


async def test_chunked_body_arriving_in_pieces_is_forwarded_whole(sidecar_factory, upstream):
    sc, app, port = await start(sidecar_factory, upstream)
    async with await Client.connect(port) as client:
        await client.send(b"PUT /p HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"3\r\nab", b"c\r\n", b"2\r", b"\nde\r\n0\r", b"\n\r\n"):
            await client.send(piece)
            await asyncio.sleep(0)
        resp = await client.response()
    assert resp.status == 200
    assert app.requests[0].body == b"abcde"


async def test_header_values_are_forwarded_byte_for_byte(sidecar_factory, upstream):
    sc, app, port = await start(sidecar_factory, upstream)
    odd = b'a  b\t c;"q"=\xe9,  ,x'
    data = (
        b"GET / HTTP/1.1\r\nHost: test\r\nX-Odd: "
        + odd
        + b"\r\nX-Empty:\r\nx-MiXeD-CaSe: v\r\nX-Dup: 1\r\nX-Dup: 2\r\n\r\n"
    )
    resp = await request(port, data)
    assert resp.status == 200
    raw = app.requests[0].raw_head
    assert b"\r\nX-Odd: " + odd + b"\r\n" in raw
    assert b"\r\nX-Empty: \r\n" in raw or b"\r\nX-Empty:\r\n" in raw
    assert b"\r\nx-MiXeD-CaSe: v\r\n" in raw
    assert b"\r\nX-Dup: 1\r\nX-Dup: 2\r\n" in raw


async def test_hop_by_hop_headers_are_stripped(sidecar_factory, upstream):
    sc, app, port = await start(sidecar_factory, upstream)
    resp = await request(
        port,
        get(
            "/",
            "Connection: keep-alive, X-Drop-Me, x-also-drop",
            "Keep-Alive: timeout=5",
            "TE: trailers",
            "Trailer: X-T",
            "Upgrade: h2c",
            "Proxy-Connection: keep-alive",
            "X-Drop-Me: secret",
            "X-Also-Drop: secret",
            "X-Keep-Me: yes",
        ),
    )
    assert resp.status == 200
    names = app.requests[0].names()
    for gone in (
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "x-drop-me",
        "x-also-drop",
    ):
        assert gone not in names, gone
    assert app.requests[0].get("X-Keep-Me") == "yes"


async def test_hop_by_hop_headers_of_the_response_are_stripped(sidecar_factory, upstream):
    async def handler(req: Received, reply: Reply) -> None:
        await reply.send(
            200,
            b"ok",
            [
                ("Connection", "X-Internal"),
                ("X-Internal", "1"),
                ("Keep-Alive", "timeout=5"),
                ("Proxy-Connection", "keep-alive"),
                ("X-Public", "2"),
            ],
        )

    sc, app, port = await start(sidecar_factory, upstream, handler)
    resp = await request(port, get("/"))
    assert resp.status == 200 and resp.body == b"ok"
    assert not {"x-internal", "keep-alive", "proxy-connection"} & resp.names()
    assert resp.get("X-Public") == "2"


async def test_x_forwarded_for_is_appended_and_proto_set_when_absent(sidecar_factory, upstream):
    sc, app, port = await start(sidecar_factory, upstream)
    await request(port, get("/1"))
    await request(port, get("/2", "X-Forwarded-For: 1.2.3.4", "X-Forwarded-Proto: https"))
    await request(port, get("/3", "X-Forwarded-For: 1.2.3.4", "X-Forwarded-For: 5.6.7.8"))
    first, second, third = app.requests
    assert first.get_all("X-Forwarded-For") == ["127.0.0.1"]
    assert first.get_all("X-Forwarded-Proto") == ["http"]
    assert second.get_all("X-Forwarded-For") == ["1.2.3.4, 127.0.0.1"]
    assert second.get_all("X-Forwarded-Proto") == ["https"]
    assert third.get_all("X-Forwarded-For") == ["1.2.3.4, 5.6.7.8, 127.0.0.1"]


async def test_app_base_path_prefixes_the_target(sidecar_factory, upstream):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url + "/base/"}})
    resp = await request(sc.ports["inbound"], get("/x?y=1"))
    assert resp.status == 200
    assert app.requests[0].target == "/base/x?y=1"


async def test_http10_request_without_host_reaches_the_app_as_valid_http11(
    sidecar_factory, upstream
):
    sc, app, port = await start(sidecar_factory, upstream)
    async with await Client.connect(port) as client:
        await client.send(b"GET /old HTTP/1.0\r\n\r\n")
        resp = await client.response()
    assert resp.status == 200
    (req,) = app.requests
    assert req.version == "HTTP/1.1"
    # RFC 9112 §3.2: a client MUST send Host in every HTTP/1.1 request
    assert req.get("Host")


async def test_unsupported_transfer_coding_is_refused_with_501(sidecar_factory, upstream):
    # the sidecar carries only `chunked`; silently dropping `gzip` would hand the app
    # gzip bytes labelled as plain ones
    sc, app, port = await start(sidecar_factory, upstream)
    payload = gzip.compress(b"hello")
    body = b"%x\r\n" % len(payload) + payload + b"\r\n0\r\n\r\n"
    resp = await request(
        port,
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + body,
    )
    assert resp.status == 501
    assert error_of(resp)["code"] == "NOT_IMPLEMENTED"
    assert app.requests == []


# --- app failures --------------------------------------------------------------------------------


async def test_app_unreachable_is_502_upstream_unavailable(sidecar_factory):
    sc = await sidecar_factory({"app": {"url": f"http://127.0.0.1:{closed_port()}"}})
    resp = await request(sc.ports["inbound"], get("/"))
    assert resp.status == 502
    assert error_of(resp)["code"] == "UPSTREAM_UNAVAILABLE"


async def test_app_closing_before_responding_is_502(sidecar_factory, upstream):
    async def handler(req: Received, reply: Reply) -> None:
        reply.reset()

    sc, app, port = await start(sidecar_factory, upstream, handler)
    resp = await request(port, get("/", method="POST", body=b"x"))
    assert resp.status == 502
    assert error_of(resp)["code"] == "UPSTREAM_UNAVAILABLE"


@pytest.mark.parametrize("chunked", [False, True])
async def test_app_reset_mid_body_aborts_the_client_connection(sidecar_factory, upstream, chunked):
    async def handler(req: Received, reply: Reply) -> None:
        if chunked:
            reply.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        else:
            reply.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello")
        await reply.drain()
        reply.reset()

    sc, app, port = await start(sidecar_factory, upstream, handler)
    async with await Client.connect(port) as client:
        await client.send(get("/"))
        # the head is out, so the only honest signal left is a cut connection: it must come
        # at once (read_to_eof times out otherwise), and what came before must be incomplete
        data = await client.read_to_eof(timeout=1.0)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"HTTP/1.1 " not in body, "a second response was written into the body"
    if chunked:
        assert not body.endswith(b"0\r\n\r\n")
    else:
        assert len(body) < 100


# --- connection handling -------------------------------------------------------------------------


async def test_keep_alive_carries_several_requests_on_one_connection(sidecar_factory, upstream):
    sc, app, port = await start(sidecar_factory, upstream)
    async with await Client.connect(port) as client:
        for i in range(5):
            await client.send(get(f"/{i}"))
            resp = await client.response()
            assert resp.status == 200 and resp.body == f"GET /{i}".encode()
            assert resp.get("connection") != "close"
    assert [r.target for r in app.requests] == [f"/{i}" for i in range(5)]
    # and the sidecar kept its app connection alive too
    assert app.connections == 1


async def test_pipelined_requests_are_answered_in_order(sidecar_factory, upstream):
    async def handler(req: Received, reply: Reply) -> None:
        if req.target == "/slow":
            await asyncio.sleep(0.1)  # a slow first answer must not let later ones overtake
        await reply.send(200, req.target.encode() + req.body)

    sc, app, port = await start(sidecar_factory, upstream, handler)
    async with await Client.connect(port) as client:
        await client.send(
            get("/slow")
            + get("/b", method="POST", body=b"-body")
            + get("/c")
            + b"PUT /d HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"2\r\n-d\r\n0\r\n\r\n"
        )
        bodies = [(await client.response()).body for _ in range(4)]
    assert bodies == [b"/slow", b"/b-body", b"/c", b"/d-d"]


async def test_head_response_has_no_body_and_keeps_the_connection_in_sync(
    sidecar_factory, upstream
):
    async def handler(req: Received, reply: Reply) -> None:
        if req.method == "HEAD":
            reply.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
            await reply.drain()
        else:
            await reply.send(200, b"after")

    sc, app, port = await start(sidecar_factory, upstream, handler)
    async with await Client.connect(port) as client:
        await client.send(get("/", method="HEAD"))
        head = await client.response("HEAD")
        assert head.status == 200 and head.get("content-length") == "1234"
        assert head.get("transfer-encoding") is None
        await client.send(get("/next"))
        nxt = await client.response()
    assert nxt.status == 200 and nxt.body == b"after"


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_statuses_keep_the_connection_in_sync(sidecar_factory, upstream, status):
    async def handler(req: Received, reply: Reply) -> None:
        if req.target == "/empty":
            reply.write(f'HTTP/1.1 {status} X\r\nETag: "e"\r\n\r\n'.encode())
            await reply.drain()
        else:
            await reply.send(200, b"after")

    sc, app, port = await start(sidecar_factory, upstream, handler)
    async with await Client.connect(port) as client:
        await client.send(get("/empty"))
        resp = await client.response()
        assert resp.status == status
        assert resp.get("transfer-encoding") is None
        assert resp.get("content-length") in (None, "0")
        await client.send(get("/next"))
        nxt = await client.response()
    assert nxt.status == 200 and nxt.body == b"after"


async def test_close_delimited_app_response_is_rechunked_for_the_client(sidecar_factory, upstream):
    async def handler(req: Received, reply: Reply) -> None:
        reply.write(b"HTTP/1.1 200 OK\r\n\r\nuntil-close")
        await reply.drain()
        reply.close()

    sc, app, port = await start(sidecar_factory, upstream, handler)
    async with await Client.connect(port) as client:
        await client.send(get("/1"))
        first = await client.response()
        assert first.framing == "chunked" and first.body == b"until-close"
        await client.send(get("/2"))
        assert (await client.response()).body == b"until-close"


async def test_expect_100_continue_gets_a_100_before_the_body_is_sent(sidecar_factory, upstream):
    sc, app, port = await start(sidecar_factory, upstream)
    async with await Client.connect(port) as client:
        await client.send(
            b"POST /e HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
        )
        interim = await client.response(interim=True)
        assert interim.status == 100
        await client.send(b"data")
        resp = await client.response()
    assert resp.status == 200
    assert app.requests[0].body == b"data"
