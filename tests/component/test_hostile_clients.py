"""Clients that try to take what other clients need: pipelines that end early, connection
floods, slow bodies and slow readers. Each case sends the exact bytes an attacker would."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.component.servers import (
    Received,
    Reply,
    error_of,
    get,
    request,
    sample,
    wait_until,
)

#: an app pool of one connection: anything that holds it shows at once
ONE_CONNECTION = {"max_connections": 1, "max_idle": 1, "max_pending": 1}


def client_errors(sc: Any, reason: str, listener: str = "inbound") -> float:
    return sample(sc, "gts_sidecar_client_errors_total", listener=listener, reason=reason)


# --- pipelining ------------------------------------------------------------------------------


async def test_a_pipelined_request_with_connection_close_is_answered(
    sidecar_factory, upstream, connect
):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    client = await connect(sc.ports["inbound"])
    await client.send(
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    first = await client.response()
    second = await client.response()
    assert (first.status, first.body) == (200, b"GET /1")
    assert (second.status, second.body) == (200, b"GET /2")
    assert await client.read_to_eof() == b""
    # what followed the request that closed the connection was not run
    assert [r.target for r in app.requests] == ["/1", "/2"]


async def test_requests_before_a_malformed_one_are_answered_then_400(
    sidecar_factory, upstream, connect
):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    client = await connect(sc.ports["inbound"])
    await client.send(
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /3 HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n"
    )
    statuses = [(await client.response()).status for _ in range(3)]
    assert statuses == [200, 200, 400]
    assert await client.closed()
    assert [r.target for r in app.requests] == ["/1", "/2"]


# --- connections -----------------------------------------------------------------------------


async def test_connections_past_the_listener_cap_get_503_and_are_closed(
    sidecar_factory, upstream, connect
):
    app = await upstream()
    sc = await sidecar_factory(
        {"app": {"url": app.url}, "listeners": {"inbound": {"clients": {"max_connections": 3}}}}
    )
    port = sc.ports["inbound"]
    held = [await connect(port) for _ in range(3)]
    await wait_until(lambda: len(sc.inbound.connections) == 3)
    extra = await connect(port)
    await extra.send(get("/"))
    refused = await extra.response()
    assert refused.status == 503
    assert error_of(refused)["code"] == "CONNECTION_LIMIT"
    assert await extra.closed()
    assert client_errors(sc, "connection_limit") == 1
    # a held connection still works, and once one closes there is room again
    await held[0].send(get("/ok"))
    assert (await held[0].response()).status == 200
    held[1].close()
    await wait_until(lambda: len(sc.inbound.connections) == 2)
    assert (await request(port, get("/again"))).status == 200


async def test_the_per_client_cap_counts_one_address(sidecar_factory, upstream, connect):
    app = await upstream()
    sc = await sidecar_factory(
        {
            "app": {"url": app.url},
            "listeners": {"inbound": {"clients": {"max_connections_per_client": 2}}},
        }
    )
    port = sc.ports["inbound"]
    await connect(port)
    await connect(port)
    await wait_until(lambda: len(sc.inbound.connections) == 2)
    third = await connect(port)
    resp = await third.response()
    assert resp.status == 503 and error_of(resp)["code"] == "CONNECTION_LIMIT"


async def test_a_connection_that_sends_nothing_is_closed_after_header_read(
    sidecar_factory, upstream, connect
):
    app = await upstream()
    sc = await sidecar_factory(
        {
            "app": {"url": app.url},
            "listeners": {"inbound": {"timeouts": {"header_read": "200ms", "keepalive": "60s"}}},
        }
    )
    idle = await connect(sc.ports["inbound"])
    # closed after header_read (200 ms), not after the 60 s keep-alive time
    assert await idle.read_to_eof(timeout=5) == b""
    assert client_errors(sc, "idle_timeout") == 1


# --- slow bodies and slow readers ------------------------------------------------------------


async def test_a_slow_body_never_takes_a_pooled_upstream_connection(
    sidecar_factory, upstream, connect
):
    app = await upstream()
    sc = await sidecar_factory(
        {
            "app": {
                "url": app.url,
                "pool": {"max_connections": 1, "max_idle": 1, "max_pending": 1},
            },
            "listeners": {
                "inbound": {"clients": {"min_rate_bytes": "1KiB", "min_rate_window": "300ms"}}
            },
        }
    )
    port = sc.ports["inbound"]
    slow = await connect(port)
    await slow.send(b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n")
    await slow.send(b"x")
    # the app's one pooled connection is free for everybody else meanwhile
    for i in range(3):
        assert (await request(port, get(f"/fast/{i}"))).status == 200
    assert app.connections == 1
    assert [r.target for r in app.requests] == ["/fast/0", "/fast/1", "/fast/2"]
    # and the slow client is cut as too slow, as the client's fault
    resp = await slow.response()
    assert resp.status == 408
    assert error_of(resp)["code"] == "REQUEST_TIMEOUT"
    assert client_errors(sc, "body_timeout") == 1
    assert (
        sample(
            sc,
            "gts_sidecar_upstream_timeouts_total",
            listener="inbound",
            upstream="app",
            kind="total",
        )
        == 0
    )


async def test_a_body_that_fits_the_buffer_is_sent_whole_once_it_is_in(
    sidecar_factory, upstream, connect
):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    client = await connect(sc.ports["inbound"])
    await client.send(b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello")
    await client.send(b"world")
    resp = await client.response()
    assert resp.status == 200
    (seen,) = app.requests
    assert seen.body == b"helloworld"


async def test_a_slow_reader_of_a_large_response_is_cut_and_frees_the_upstream(
    sidecar_factory, upstream
):
    big = b"z" * (8 << 20)

    async def large(req: Received, reply: Reply) -> None:
        if req.target == "/big":
            await reply.send(200, big)
        else:
            await reply.send(200, b"small")

    app = await upstream(large)
    sc = await sidecar_factory(
        {
            "app": {
                "url": app.url,
                "pool": {"max_connections": 1, "max_idle": 1, "max_pending": 1},
            },
            "listeners": {
                "inbound": {"clients": {"min_rate_bytes": "64KiB", "min_rate_window": "300ms"}}
            },
        }
    )
    port = sc.ports["inbound"]
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)
    try:
        writer.transport.set_write_buffer_limits(0)  # type: ignore[attr-defined]
        sock = writer.get_extra_info("socket")
        sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 4096)
        writer.write(get("/big"))
        await writer.drain()
        # read a little, then stop reading: the sidecar's buffer fills and stays full
        await reader.readexactly(1024)
        reader._transport.pause_reading()  # type: ignore[attr-defined]
        await wait_until(lambda: client_errors(sc, "slow_read") == 1, timeout=10)
        # the upstream connection was given up: the next request gets the pool's one slot
        assert (await request(port, get("/small"))).status == 200
    finally:
        writer.transport.abort()
