"""nginx on both sides of the sidecar, as it is in most deployments: an ingress in front of
the inbound listener (HTTP/1.1 with upstream keep-alive, its default HTTP/1.0 proxy_pass, and
gRPC with `grpc_pass`), and a server behind it (the app, or an outbound upstream).

What only a real nginx does, and these tests hold the sidecar to: it keeps a few connections
to the sidecar and sends many requests on each; it closes its upstream connection when its
own client gives up (`proxy_ignore_client_abort off`, the default); as a server it closes
keep-alive connections on its own schedule (`keepalive_timeout`, and after
`keepalive_requests` with `Connection: close` on the last answer).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests.component.h2client import H2Client
from tests.component.servers import (
    Received,
    Reply,
    error_of,
    get,
    read_response,
    sample,
    wait_until,
)
from tests.component.test_abandon import ORDERS, PATIENT, WaitsForItsClient, rolled_back
from tests.component.test_early_answer import send_body, until_reset
from tests.realpeers.conftest import Nginx
from tests.realpeers.peers import (
    GOOD_XID,
    GRPC_INGRESS,
    INGRESS,
    INGRESS_HTTP10,
    INGRESS_STREAMING,
    SERVER,
    TRUNCATED_XID,
    connections_to,
    declarative,
    fields,
    idle,
    retries,
    xid,
)

# --- 1. nginx as an HTTP/1.1 ingress -----------------------------------------------------------


async def test_an_nginx_ingress_sends_many_requests_on_one_sidecar_connection(
    sidecar_factory, upstream, connect, nginx
):
    """nginx keeps its upstream connection to the sidecar open between requests, so the
    sidecar must keep it too; and each request's XID reaches the app."""
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    inbound = sc.ports["inbound"]
    ingress = await nginx(INGRESS, inbound=inbound)
    before = connections_to(inbound)
    client = await connect(ingress.port)
    used: set[int] = set()
    for i in range(30):
        await client.send(get(f"/items/{i}", f"XID: {xid(i)}"))
        resp = await client.response()
        assert resp.status == 200, resp.raw_head
        used |= connections_to(inbound) - before
    # one connection from nginx to the sidecar carried all 30 (a sidecar closing after each
    # answer would have made nginx open 30)
    assert len(used) == 1
    assert sample(sc, "gts_sidecar_downstream_connections", listener="inbound") == 1
    assert [r.get("XID") for r in app.requests] == [xid(i) for i in range(30)]


async def test_a_malformed_xid_through_nginx_is_the_sidecars_400_and_never_reaches_the_app(
    sidecar_factory, upstream, connect, nginx
):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    ingress = await nginx(INGRESS, inbound=sc.ports["inbound"])
    client = await connect(ingress.port)
    await client.send(get("/items/1", f"XID: {TRUNCATED_XID}"))
    resp = await client.response()
    assert resp.status == 400
    assert error_of(resp)["code"] == "XID_INVALID"  # the JSON body and x-gts-sidecar-error
    assert app.requests == []
    # and the next request through the same nginx is served
    await client.send(get("/items/2", f"XID: {GOOD_XID}"))
    resp = await client.response()
    assert resp.status == 200
    assert [r.get("XID") for r in app.requests] == [GOOD_XID]


@pytest.mark.parametrize(("status", "outcome"), [(201, "Committed"), (409, "Rollbacked")])
async def test_a_declarative_transaction_through_nginx_ends_by_the_apps_status(
    sidecar_factory, upstream, connect, nginx, status, outcome
):
    async def answers(req: Received, reply: Reply) -> None:
        await reply.send(status, b'{"id":"1"}', [("Content-Type", "application/json")])

    app = await upstream(answers)
    sc = await sidecar_factory({"app": {"url": app.url}, **ORDERS})
    ingress = await nginx(INGRESS, inbound=sc.ports["inbound"])
    client = await connect(ingress.port)
    await client.send(get("/orders", method="POST", body=b'{"sku":"A-1"}'))
    resp = await client.response()
    assert resp.status == status
    (seen,) = app.requests
    xid = resp.get("XID")
    assert xid is not None and seen.get("XID") == xid
    assert resp.get("x-gts-transaction-status") == outcome
    assert (await sc.control.engine.get(xid))[0].status.value == outcome


@pytest.mark.parametrize("framing", ["chunked", "close"])
async def test_nginx_proxying_in_http10_gets_whole_answers_with_the_xid_delivered(
    sidecar_factory, upstream, connect, nginx, framing
):
    """nginx's default proxy_pass speaks HTTP/1.0: an app's chunked answer (or one delimited
    by its close) must reach it in a framing HTTP/1.0 has, whole."""
    pieces = [b"%05d" % i * 100 for i in range(50)]

    async def streams(req: Received, reply: Reply) -> None:
        if framing == "chunked":
            reply.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in pieces:
                reply.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await reply.drain()
            reply.write(b"0\r\n\r\n")
        else:
            reply.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            for piece in pieces:
                reply.write(piece)
                await reply.drain()
            reply.close()

    app = await upstream(streams)
    sc = await sidecar_factory({"app": {"url": app.url}})
    ingress = await nginx(INGRESS_HTTP10, inbound=sc.ports["inbound"])
    client = await connect(ingress.port)
    for i in range(3):
        await client.send(get(f"/report/{i}", f"XID: {xid(i)}"))
        resp = await client.response()
        assert resp.status == 200, resp.raw_head
        assert resp.body == b"".join(pieces)
    assert [r.get("XID") for r in app.requests] == [xid(i) for i in range(3)]
    lines = [fields(line) for line in await ingress.wait_log_lines(3)]
    assert [line["up"] for line in lines] == ["200"] * 3


async def test_large_bodies_stream_through_nginx_and_the_sidecar_both_ways(
    sidecar_factory, upstream, connect, nginx
):
    """8 MiB up in chunks, passed on by nginx as they come (chunked: the length is known to
    nobody), and 8 MiB down, unbuffered: the checksums agree at each end."""
    size = 8 << 20
    down = bytes(range(256)) * (size // 256)

    async def echo_size_then_data(req: Received, reply: Reply) -> None:
        head = f"HTTP/1.1 200 OK\r\nX-Got: {req.body_size} {req.body_sha256}\r\n"
        reply.write(head.encode() + b"Content-Length: %d\r\n\r\n" % size)
        for at in range(0, size, 1 << 18):
            reply.write(down[at : at + (1 << 18)])
            await reply.drain()

    app = await upstream(echo_size_then_data, keep=0)
    sc = await sidecar_factory({"app": {"url": app.url}})
    ingress = await nginx(INGRESS_STREAMING, inbound=sc.ports["inbound"])
    up = hashlib.sha256()
    client = await connect(ingress.port)
    head = f"POST /upload HTTP/1.1\r\nHost: a\r\nXID: {GOOD_XID}\r\n"
    await client.send(head.encode() + b"Transfer-Encoding: chunked\r\n\r\n")
    for at in range(0, size, 1 << 18):
        piece = bytes([at >> 18 & 0xFF]) * (1 << 18)
        up.update(piece)
        await client.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    await client.send(b"0\r\n\r\n")
    resp = await client.response(timeout=30)
    assert resp.status == 200, resp.raw_head
    assert resp.get("x-got") == f"{size} {up.hexdigest()}"
    assert resp.body_size == size and resp.body_sha256 == hashlib.sha256(down).hexdigest()
    (seen,) = app.requests
    assert seen.framing == "chunked"
    assert seen.get("XID") == GOOD_XID


# --- 2. the client gives up on nginx ------------------------------------------------------------


@pytest.mark.parametrize("leave", ["fin", "reset"])
async def test_a_client_that_leaves_nginx_rolls_its_transaction_back(
    sidecar_factory, upstream, connect, nginx, leave
):
    """nginx closes its connection to the sidecar when its own client goes away
    (`proxy_ignore_client_abort off`): for the sidecar that is the client leaving, and the
    transaction the request began must roll back, as with a direct client."""
    handler = WaitsForItsClient()
    app = await upstream(handler)
    sc = await sidecar_factory({"app": {"url": app.url, **PATIENT}, **ORDERS})
    ingress = await nginx(INGRESS, inbound=sc.ports["inbound"])
    client = await connect(ingress.port)
    await client.send(get("/orders", method="POST", body=b'{"sku":"A-1"}'))
    await asyncio.wait_for(handler.started.wait(), 10)
    (xid,) = handler.xids
    assert xid is not None
    if leave == "fin":
        client.writer.get_extra_info("socket").shutdown(socket.SHUT_WR)
    else:
        client.reset()
    # the app's request ends now, not at the 60 s total timeout
    await asyncio.wait_for(handler.ended.wait(), 10)
    await rolled_back(sc, xid)
    await wait_until(lambda: sample(sc, "gts_sidecar_client_aborts_total", listener="inbound") == 1)
    await wait_until(lambda: declarative(sc, "create-order", "Rollbacked") == 1)
    (line,) = await ingress.wait_log_lines(1)
    assert fields(line)["status"] == "499"  # nginx's "client closed request"
    assert len(app.requests) == 1


# --- 3. nginx grpc_pass in front of the inbound listener -----------------------------------------


@pytest.fixture
def grpc_channel() -> Iterator[Any]:
    channels: list[grpc.Channel] = []

    def make(port: int) -> grpc.Channel:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return channel

    yield make
    for channel in channels:
        channel.close()


def unary(channel: grpc.Channel, method: str, request: bytes, **kw: Any) -> tuple[bytes, Any]:
    result: tuple[bytes, Any] = channel.unary_unary(method).with_call(request, timeout=20, **kw)
    return result


async def grpc_through_nginx(sidecar_factory: Any, grpc_app: Any, nginx: Any, **cfg: Any) -> Any:
    app, port = grpc_app
    sc = await sidecar_factory(
        {"app": {"url": f"http://127.0.0.1:{port}", "protocol": "h2c"}, **cfg}
    )
    ingress = await nginx(GRPC_INGRESS, inbound=sc.ports["inbound"])
    return app, sc, ingress


async def test_grpc_through_nginx_delivers_the_metadata_xid(
    sidecar_factory, grpc_app, nginx, grpc_channel
):
    app, sc, ingress = await grpc_through_nginx(sidecar_factory, grpc_app, nginx)
    channel = grpc_channel(ingress.port)
    for i in range(3):
        reply, _ = await asyncio.to_thread(
            unary, channel, "/pkg.Svc/Echo", b"%d" % i, metadata=[("xid", xid(i))]
        )
        assert reply == b"echo:%d" % i
    assert app.xids == [xid(i) for i in range(3)]


async def test_a_truncated_xid_through_nginx_is_invalid_argument_before_the_app(
    sidecar_factory, grpc_app, nginx, grpc_channel
):
    app, sc, ingress = await grpc_through_nginx(sidecar_factory, grpc_app, nginx)
    channel = grpc_channel(ingress.port)
    with pytest.raises(grpc.RpcError) as info:
        await asyncio.to_thread(
            unary, channel, "/pkg.Svc/Echo", b"hi", metadata=[("xid", TRUNCATED_XID)]
        )
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "XID" in (info.value.details() or "")
    trailing = dict(info.value.trailing_metadata() or ())
    assert trailing.get("x-gts-sidecar-error") == "XID_INVALID"
    assert app.calls == 0


async def test_a_server_streaming_call_passes_through_nginx(
    sidecar_factory, grpc_app, nginx, grpc_channel
):
    app, sc, ingress = await grpc_through_nginx(sidecar_factory, grpc_app, nginx)
    channel = grpc_channel(ingress.port)

    def stream() -> list[bytes]:
        return list(channel.unary_stream("/pkg.Svc/Count")(b"50", timeout=20))

    assert await asyncio.to_thread(stream) == [b"%d" % i for i in range(50)]


async def test_large_grpc_messages_and_many_calls_pass_through_nginx(
    sidecar_factory, grpc_app, nginx, grpc_channel
):
    """3 MiB each way (far past HTTP/2's 64 KiB initial windows: nginx's and the sidecar's
    flow control must keep each other going), then 60 calls, several at once (nginx carries
    one call at a time on each of its upstream connections to the sidecar)."""
    app, sc, ingress = await grpc_through_nginx(sidecar_factory, grpc_app, nginx)
    channel = grpc_channel(ingress.port)
    message = bytes(range(256)) * (3 << 12)
    reply, _ = await asyncio.to_thread(unary, channel, "/pkg.Svc/Echo", message)
    assert reply == b"echo:" + message
    replies = await asyncio.gather(
        *(asyncio.to_thread(unary, channel, "/pkg.Svc/Echo", b"%d" % i) for i in range(60))
    )
    assert sorted(reply for reply, _ in replies) == sorted(b"echo:%d" % i for i in range(60))


async def test_a_grpc_transaction_through_nginx_commits_on_ok(
    sidecar_factory, grpc_app, nginx, grpc_channel
):
    rules = [{"match": {"method": "POST", "path": "/pkg.Svc/Echo"}, "name": "echo"}]
    app, sc, ingress = await grpc_through_nginx(
        sidecar_factory, grpc_app, nginx, transactions=rules
    )
    channel = grpc_channel(ingress.port)
    reply, call = await asyncio.to_thread(unary, channel, "/pkg.Svc/Echo", b"order")
    assert reply == b"echo:order"
    initial = dict(call.initial_metadata())
    assert app.xids == [initial["xid"]]
    assert initial["x-gts-transaction-status"] == "Committed"
    assert (await sc.control.engine.get(initial["xid"]))[0].status.value == "Committed"


async def test_a_grpc_client_that_cancels_through_nginx_rolls_its_transaction_back(
    sidecar_factory, grpc_app, nginx, grpc_channel
):
    """The client cancels; nginx closes its upstream connection to the sidecar (it sends no
    RST_STREAM): the app's call is cancelled and the transaction it began rolls back."""
    rules = [
        {"match": {"method": "POST", "path": "/pkg.Svc/Slow"}, "name": "slow", "timeout": "90s"}
    ]
    app, port = grpc_app
    patient = {"timeouts": {"response_header": "50s", "total": "60s"}}
    sc = await sidecar_factory(
        {
            "app": {"url": f"http://127.0.0.1:{port}", "protocol": "h2c", **patient},
            "transactions": rules,
        }
    )
    ingress = await nginx(GRPC_INGRESS, inbound=sc.ports["inbound"])
    channel = grpc_channel(ingress.port)
    future = channel.unary_unary("/pkg.Svc/Slow").future(b"x", timeout=30)
    assert await asyncio.to_thread(app.started.wait, 10)
    future.cancel()
    assert await asyncio.to_thread(app.cancelled.wait, 10)
    await wait_until(lambda: sample(sc, "gts_sidecar_client_aborts_total", listener="inbound") == 1)
    await wait_until(lambda: declarative(sc, "slow", "Rollbacked") == 1)
    assert declarative(sc, "slow", "Committed") == 0
    (line,) = await ingress.wait_log_lines(1)
    assert fields(line)["status"] == "499"


# --- 4. nginx as the app behind the sidecar -------------------------------------------------------


async def nginx_app(
    sidecar_factory: Any, nginx: Any, *, keepalive_timeout: str = "75s", keepalive_requests: int
) -> tuple[Any, Nginx]:
    server = await nginx(
        SERVER, keepalive_timeout=keepalive_timeout, keepalive_requests=keepalive_requests
    )
    # the sidecar's own idle timeout is far longer than nginx's: what closes a pooled
    # connection in these tests is nginx
    pool = {"max_connections": 4, "max_idle": 4, "idle_timeout": "5m"}
    sc = await sidecar_factory({"app": {"url": server.url, "pool": pool}})
    return sc, server


async def test_nginx_closing_after_its_keepalive_requests_never_breaks_a_request(
    sidecar_factory, connect, nginx
):
    """`keepalive_requests 2`: nginx answers the 2nd request on a connection with
    `Connection: close` and closes it. The sidecar must not pool that connection: reusing it
    would fail, and a GET would then be retried, which the retry counter shows. The requests
    are pipelined, so the next one is waiting for a connection the moment an answer ends,
    before the sidecar can have read nginx's FIN."""
    sc, server = await nginx_app(sidecar_factory, nginx, keepalive_requests=2)
    client = await connect(sc.ports["inbound"])
    await client.send(b"".join(get(f"/r{i}", f"XID: {GOOD_XID}", f"X-Req: {i}") for i in range(8)))
    for _ in range(8):
        resp = await client.response()
        assert resp.status == 200 and resp.body == b"ok\n", resp.raw_head
    lines = [fields(line) for line in await server.wait_log_lines(8)]
    assert [line["req"] for line in lines] == [str(i) for i in range(8)]
    assert [line["n"] for line in lines] == ["1", "2"] * 4
    assert len({line["conn"] for line in lines}) == 4
    assert retries(sc) == 0


async def test_a_connection_nginx_closed_idle_leaves_the_pool_before_the_next_request(
    sidecar_factory, connect, nginx
):
    """`keepalive_timeout 1s`: nginx closes the idle connection (a FIN) while it sits in the
    sidecar's pool. The pool drops it when the FIN arrives, so the next request goes on a new
    connection, with no retry."""
    sc, server = await nginx_app(
        sidecar_factory, nginx, keepalive_timeout="1s", keepalive_requests=100
    )
    client = await connect(sc.ports["inbound"])
    await client.send(get("/first", f"XID: {GOOD_XID}"))
    assert (await client.response()).status == 200
    assert idle(sc) == 1
    await wait_until(lambda: idle(sc) == 0, timeout=15)
    await client.send(get("/second", f"XID: {GOOD_XID}"))
    assert (await client.response()).status == 200
    first, second = (fields(line) for line in await server.wait_log_lines(2))
    assert first["conn"] != second["conn"] and second["n"] == "1"
    assert retries(sc) == 0


async def test_posts_to_nginx_reach_it_exactly_once_across_its_closes(
    sidecar_factory, connect, nginx
):
    """POSTs, pipelined, on connections nginx closes after every 2nd answer, then one after
    nginx closed an idle connection: each is answered 200 and reaches nginx exactly once. A
    POST sent on a connection nginx had closed would be a 502 (a POST is never retried: the
    sidecar cannot know whether the app saw it)."""
    sc, server = await nginx_app(
        sidecar_factory, nginx, keepalive_timeout="1s", keepalive_requests=2
    )
    client = await connect(sc.ports["inbound"])

    def post(i: int) -> bytes:
        return get("/pay", f"XID: {GOOD_XID}", f"X-Req: {i}", method="POST", body=b"{}")

    await client.send(b"".join(post(i) for i in range(5)))
    for _ in range(5):
        resp = await client.response()
        assert resp.status == 200, resp.raw_head
    # the 5th left an idle connection: once nginx has closed it, POST again
    assert idle(sc) == 1
    await wait_until(lambda: idle(sc) == 0, timeout=15)
    await client.send(post(5))
    resp = await client.response()
    assert resp.status == 200, resp.raw_head
    lines = [fields(line) for line in await server.wait_log_lines(6)]
    assert [(line["method"], line["req"]) for line in lines] == [("POST", str(i)) for i in range(6)]
    assert [line["n"] for line in lines] == ["1", "2", "1", "2", "1", "1"]
    assert len({line["conn"] for line in lines}) == 4
    assert retries(sc) == 0


async def test_uploads_nginx_refuses_early_get_its_413_over_both_framings(sidecar_factory, nginx):
    """nginx (client_max_body_size 1m, its default) answers 413 to a 16 MB upload as soon as
    it has the head. HTTP/1.1: a client that writes its whole body before reading, as h2load
    does, gets that 413 with `Connection: close` and then a FIN, never a reset (the sidecar
    reads and drops the rest; it used to reset after a MiB). HTTP/2: the 413, then the
    stream reset with NO_ERROR (stop sending), and the connection serves on."""
    sc, _ = await nginx_app(sidecar_factory, nginx, keepalive_requests=1000)
    port = sc.ports["inbound"]
    size = 16_000_000  # (more than the sockets between hold: the sidecar must read it)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // 1_000_000):
            writer.write(b"x" * 1_000_000)
            await writer.drain()
        resp = await read_response(reader, "POST", timeout=10)
        assert resp.status == 413 and resp.get("connection") == "close", resp.raw_head
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()
    client = await H2Client.connect(port)
    try:
        sid = await client.send_request(
            "/upload", method="POST", headers=[("content-length", str(size))], end=False
        )
        await send_body(client, sid, b"x" * 200_000)
        resp2 = await until_reset(client, sid)
        assert (resp2.status, resp2.reset) == (413, 0)
        assert (await client.get("/after")).status == 200
    finally:
        client.close()


# --- 5. nginx as an outbound upstream -----------------------------------------------------------


async def test_the_outbound_listener_forwards_the_xid_to_nginx(sidecar_factory, connect, nginx):
    server = await nginx(SERVER, keepalive_timeout="75s", keepalive_requests=1000)
    sc = await sidecar_factory({"upstreams": {"orders": {"url": server.url}}})
    client = await connect(sc.ports["outbound"])
    for i in range(5):
        await client.send(get(f"/orders/items/{i}", f"XID: {xid(i)}"))
        resp = await client.response()
        assert resp.status == 200 and resp.body == b"ok\n", resp.raw_head
    lines = [fields(line) for line in await server.wait_log_lines(5)]
    assert [line["xid"] for line in lines] == [xid(i) for i in range(5)]
    # the sidecar's pool kept one connection to nginx for all five
    assert len({line["conn"] for line in lines}) == 1
