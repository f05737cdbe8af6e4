"""HTTP/2 with prior knowledge (h2c) on the proxy listeners, beside HTTP/1.1 on the same port:
one exchange, filter and XID code under both framings. Peers: curl (nghttp2) and the tests'
own h2 client for what curl cannot be made to do."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sidecar.proxy.downstream import H2_PREFACE as PREFACE
from tests.component.h2client import H2Client
from tests.component.servers import (
    Client,
    Received,
    Reply,
    get,
    request,
    sample,
)
from tests.component.test_abandon import PATIENT, WaitsForItsClient

GOOD_XID = "10.0.0.1:8091:2001"
CURL = shutil.which("curl")


@pytest.fixture
async def h2() -> AsyncIterator[Any]:
    clients: list[H2Client] = []

    async def make(port: int) -> H2Client:
        client = await H2Client.connect(port)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


async def curl(*args: str) -> tuple[int, bytes]:
    assert CURL is not None
    proc = await asyncio.create_subprocess_exec(
        CURL, "-s", "--http2-prior-knowledge", *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
async def test_curl_over_h2c_reaches_an_http1_app_with_its_xid(sidecar_factory, upstream):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    rc, out = await curl(
        "-H", f"X-GTS-XID: {GOOD_XID}", "-w", "\n%{http_version} %{http_code}",
        f"http://127.0.0.1:{sc.ports['inbound']}/pay?x=1",
    )  # fmt: skip
    assert rc == 0
    body, _, status = out.rpartition(b"\n")
    assert status == b"2 200"
    assert body == b"GET /pay?x=1"
    (req,) = app.requests
    assert req.get_all("XID") == [GOOD_XID]
    assert "x-gts-xid" not in req.names()


async def test_a_truncated_xid_over_h2_is_refused_before_the_app(sidecar_factory, upstream, h2):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    client = await h2(sc.ports["inbound"])
    resp = await client.get("/pay", headers=[("xid", "10.0.0.1:8091:")])
    assert resp.status == 400
    assert resp.get("x-gts-sidecar-error") == "XID_INVALID"
    assert json.loads(resp.body)["error"]["code"] == "XID_INVALID"
    assert app.requests == []
    # the connection goes on serving other streams
    ok = await client.get("/next", headers=[("xid", GOOD_XID)])
    assert ok.status == 200 and ok.body == b"GET /next"


async def test_a_grpc_request_gets_a_trailers_only_error(sidecar_factory, upstream, h2):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    client = await h2(sc.ports["inbound"])
    resp = await client.get(
        "/pkg.Svc/Method",
        method="POST",
        headers=[("content-type", "application/grpc"), ("te", "trailers"), ("xid", "a:1:")],
        body=b"\x00\x00\x00\x00\x00",
    )
    assert resp.status == 200
    assert resp.get("grpc-status") == "3"  # INVALID_ARGUMENT
    assert resp.get("x-gts-sidecar-error") == "XID_INVALID"
    assert resp.body == b""
    assert app.requests == []


async def test_a_request_body_over_h2_reaches_the_app_whole(sidecar_factory, upstream, h2):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    client = await h2(sc.ports["inbound"])
    stream = await client.send_request("/upload", method="POST", body=b"hello ", end=False)
    await client.send_data(stream, b"world", end=True)
    resp = await client.response(stream)
    assert resp.status == 200
    (req,) = app.requests
    assert req.body == b"hello world"


async def test_many_streams_share_one_connection(sidecar_factory, upstream, h2):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    client = await h2(sc.ports["inbound"])
    streams = [await client.send_request(f"/s/{i}") for i in range(20)]
    bodies = [(await client.response(s)).body for s in streams]
    assert bodies == [f"GET /s/{i}".encode() for i in range(20)]
    assert sample(sc, "gts_sidecar_http2_connections_total", listener="inbound") == 1
    assert sample(sc, "gts_sidecar_http2_streams_total", listener="inbound") == 20
    # counted with the HTTP/1.1 requests too
    requests = sample(
        sc, "gts_sidecar_requests_total", listener="inbound", upstream="app", status="200"
    )
    assert requests == 20
    # and HTTP/1.1 goes on working on the same port
    assert (await request(sc.ports["inbound"], get("/h1"))).status == 200


async def test_a_stream_reset_by_the_client_ends_the_apps_request(sidecar_factory, upstream, h2):
    handler = WaitsForItsClient()

    async def slow_then_quick(req: Received, reply: Reply) -> None:
        if req.target == "/slow":
            await handler(req, reply)
        else:
            await reply.send(200, b"quick")

    app = await upstream(slow_then_quick)
    sc = await sidecar_factory({"app": {"url": app.url, **PATIENT}})
    client = await h2(sc.ports["inbound"])
    stream = await client.send_request("/slow")
    await asyncio.wait_for(handler.started.wait(), 5)
    await client.reset(stream)
    # the app's request ends now (its connection is closed), not at the 60 s total timeout
    await asyncio.wait_for(handler.ended.wait(), 5)
    assert sample(sc, "gts_sidecar_client_aborts_total", listener="inbound") == 1
    # the connection itself goes on
    assert (await client.get("/after")).status == 200


async def test_a_large_response_respects_the_clients_flow_control(sidecar_factory, upstream, h2):
    big = bytes(range(256)) * 4096  # 1 MiB, well past the 64 KiB initial window

    async def large(req: Received, reply: Reply) -> None:
        await reply.send(200, big)

    app = await upstream(large)
    sc = await sidecar_factory({"app": {"url": app.url}})
    client = await h2(sc.ports["inbound"])
    resp = await client.get("/big", timeout=10)
    assert resp.status == 200
    assert resp.get("content-length") == str(len(big))
    assert resp.body == big


async def test_outbound_listener_speaks_h2c_to_the_app(sidecar_factory, upstream, h2):
    inventory = await upstream()
    sc = await sidecar_factory({"upstreams": {"inventory": {"url": inventory.url}}})
    client = await h2(sc.ports["outbound"])
    resp = await client.get("/items/42", authority="inventory", headers=[("xid", GOOD_XID)])
    assert resp.status == 200
    (req,) = inventory.requests
    assert req.target == "/items/42"
    assert req.get("XID") == GOOD_XID


async def test_a_connection_specific_header_is_a_protocol_error(sidecar_factory, upstream, h2):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    client = await h2(sc.ports["inbound"])
    # the h2 client refuses to send it itself: write the frame by hand through its encoder
    client.conn.config.validate_outbound_headers = False
    client.conn.config.normalize_outbound_headers = False
    stream = await client.send_request("/x", headers=[("connection", "keep-alive")])
    with pytest.raises((ConnectionError, TimeoutError)):
        await client.response(stream)
    assert client.terminated is not None or client.closed
    assert app.requests == []


async def test_a_frame_that_breaks_http2_is_a_goaway_and_a_close(sidecar_factory, upstream):
    """DATA on stream 0 (a connection error): the server's SETTINGS, a GOAWAY, the connection
    closed, nothing at the app."""
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    async with await Client.connect(sc.ports["inbound"]) as client:
        await client.send(PREFACE + b"\x00\x00\x00\x00\x00\x00\x00\x00\x00")
        data = await client.read_to_eof()
    frames = []
    at = 0
    while at + 9 <= len(data):
        length = int.from_bytes(data[at : at + 3], "big")
        frames.append(data[at + 3])
        at += 9 + length
    assert frames[0] == 0x4 and 0x7 in frames  # SETTINGS first, then a GOAWAY
    assert app.requests == []
    errors = sample(sc, "gts_sidecar_client_errors_total", listener="inbound", reason="h2_protocol")
    assert errors == 1


async def test_a_preface_split_across_reads_still_opens_http2(sidecar_factory, upstream):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    async with await Client.connect(sc.ports["inbound"]) as client:
        await client.send(PREFACE[:7])
        for _ in range(5):  # let the sidecar (on this loop) read the first piece alone
            await asyncio.sleep(0)
        await client.send(PREFACE[7:] + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        head = await client.reader.readexactly(9)
    # the server's SETTINGS frame: it speaks HTTP/2
    assert head[3] == 0x4
    assert sample(sc, "gts_sidecar_http2_connections_total", listener="inbound") == 1
