"""Request-head limits, client timeouts and malformed input on the inbound listener.

Each refusal is checked from both ends: what the client got (status, the sidecar's JSON
error, a closed connection where the stream can no longer be trusted) and that the app
received nothing it should not have.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.component.servers import (
    Client,
    Received,
    Reply,
    Upstream,
    UpstreamFactory,
    error_of,
    get,
    request,
    sample,
)

LIMITS = {"request_line": 256, "header_field": 512, "header_count": 20, "header_bytes": 4096}


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamFactory]:
    factory = UpstreamFactory()
    yield factory
    await factory.close()


async def start(
    sidecar_factory: Any,
    upstream: UpstreamFactory,
    handler: Any = None,
    *,
    header_read: str = "10s",
    body_idle: str = "10s",
    keepalive: str = "60s",
) -> tuple[Any, Upstream, int]:
    app = await (upstream(handler) if handler else upstream())
    sc = await sidecar_factory(
        {
            "app": {"url": app.url},
            "listeners": {
                "inbound": {
                    "limits": LIMITS,
                    "timeouts": {
                        "header_read": header_read,
                        "body_idle": body_idle,
                        "keepalive": keepalive,
                    },
                    # body_idle alone (no minimum rate): what these tests are about
                    "clients": {"min_rate_bytes": 0},
                }
            },
        }
    )
    return sc, app, sc.ports["inbound"]


async def refused(port: int, data: bytes, timeout: float = 5.0) -> tuple[Any, bool]:
    """Send `data`, read one response, then report whether the sidecar closed the connection."""
    async with await Client.connect(port) as client:
        await client.send(data)
        resp = await client.response(timeout=timeout)
        closed = await client.closed(timeout=timeout)
    return resp, closed


def headers(n: int, size: int) -> list[str]:
    return [f"X-H{i:03d}: " + "v" * (size - 9) for i in range(n)]


# --- head limits ---------------------------------------------------------------------------------


async def test_head_within_every_limit_is_forwarded(sidecar_factory, upstream):
    sc, app, port = await start(sidecar_factory, upstream)
    # 19 + Host = 20 fields of <= 400 bytes, 3.4 KiB in all: just under each limit
    resp = await request(port, get("/" + "p" * 200, *headers(8, 400), *headers(11, 20)))
    assert resp.status == 200
    assert len(app.requests) == 1


@pytest.mark.parametrize(
    ("what", "data"),
    [
        ("header bytes", get("/", *headers(15, 400))),
        ("header count", get("/", *headers(20, 20))),
        ("one header field", get("/", "X-Big: " + "b" * 600)),
        ("request line", get("/" + "p" * 300)),
    ],
)
async def test_head_over_a_limit_is_refused(sidecar_factory, upstream, what, data):
    sc, app, port = await start(sidecar_factory, upstream)
    resp, closed = await refused(port, data)
    assert resp.status in (431, 414) if what == "request line" else resp.status == 431
    assert error_of(resp)["code"] == "HEADERS_TOO_LARGE"
    assert closed
    assert app.requests == []
    assert (
        sample(sc, "gts_sidecar_client_errors_total", listener="inbound", reason="head_limit") == 1
    )


async def test_one_endless_header_field_is_refused_without_waiting_for_its_end(
    sidecar_factory, upstream
):
    sc, app, port = await start(sidecar_factory, upstream)  # header_read is 10 s here
    async with await Client.connect(port) as client:
        started = time.monotonic()
        await client.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Endless: " + b"e" * 20_000)
        resp = await client.response(timeout=5.0)
        assert time.monotonic() - started < 2.0
    assert resp.status == 431
    assert error_of(resp)["code"] == "HEADERS_TOO_LARGE"
    assert app.requests == []


async def test_a_refused_client_still_sending_gets_the_answer_not_a_reset(
    sidecar_factory, upstream
):
    # refused after 4 KiB while ~1 MiB more is on its way: closing with that input unread
    # would make the kernel send a reset, which destroys the 431 before the client reads it
    # (lingering close: the sidecar sends a FIN after the answer and drains for a while)
    sc, app, port = await start(sidecar_factory, upstream)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * (1 << 20) + b"\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(-1), 10)  # up to the sidecar's FIN
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b"HEADERS_TOO_LARGE" in answer
    assert app.requests == []


# --- client timeouts -----------------------------------------------------------------------------


async def test_slowloris_partial_head_is_cut_off_with_408(sidecar_factory, upstream):
    sc, app, port = await start(sidecar_factory, upstream, header_read="200ms")
    async with await Client.connect(port) as client:
        started = time.monotonic()
        await client.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        resp = await client.response(timeout=2.0)
        elapsed = time.monotonic() - started
        assert await client.closed(timeout=2.0)
    assert resp.status == 408
    assert error_of(resp)["code"] == "REQUEST_TIMEOUT"
    assert 0.19 <= elapsed < 2.0
    assert app.requests == []
    assert (
        sample(sc, "gts_sidecar_client_errors_total", listener="inbound", reason="header_timeout")
        == 1
    )


async def test_trickled_head_is_cut_off_at_header_read_not_reset_by_each_byte(
    sidecar_factory, upstream
):
    sc, app, port = await start(sidecar_factory, upstream, header_read="200ms")
    head = b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"s" * 200 + b"\r\n\r\n"
    # the head is due within header_read of the accept, so the clock starts before connect
    started = time.monotonic()
    async with await Client.connect(port) as client:

        async def trickle() -> None:
            for i in range(len(head)):
                await client.send(head[i : i + 1])
                await asyncio.sleep(0.03)

        feeder = asyncio.ensure_future(trickle())
        try:
            resp = await client.response(timeout=2.0)
        finally:
            feeder.cancel()
        elapsed = time.monotonic() - started
    assert resp.status == 408
    assert 0.19 <= elapsed < 2.0
    assert app.requests == []


async def test_idle_keep_alive_connection_is_closed_after_keepalive(sidecar_factory, upstream):
    sc, app, port = await start(sidecar_factory, upstream, keepalive="200ms")
    async with await Client.connect(port) as client:
        await client.send(get("/"))
        assert (await client.response()).status == 200
        started = time.monotonic()
        assert await client.read_to_eof(timeout=2.0) == b""
        assert 0.15 <= time.monotonic() - started < 2.0


async def test_stalled_request_body_is_cut_off_after_body_idle(sidecar_factory, upstream):
    sc, app, port = await start(sidecar_factory, upstream, body_idle="200ms")
    async with await Client.connect(port) as client:
        started = time.monotonic()
        await client.send(get("/up", method="POST", body=b"0123456789" * 10)[:-90])
        resp = await client.response(timeout=2.0)
        elapsed = time.monotonic() - started
        assert await client.closed(timeout=2.0)
    assert resp.status == 408
    assert error_of(resp)["code"] == "REQUEST_TIMEOUT"
    assert 0.19 <= elapsed < 2.0
    # the body fitted the request buffer: the app was never even connected to
    assert app.connections == 0
    assert (
        sample(sc, "gts_sidecar_client_errors_total", listener="inbound", reason="body_timeout")
        == 1
    )


async def test_slow_but_flowing_body_is_not_cut_off(sidecar_factory, upstream):
    sc, app, port = await start(sidecar_factory, upstream, body_idle="200ms")
    body = b"x" * 12
    async with await Client.connect(port) as client:
        await client.send(get("/up", method="POST", body=body)[: -len(body)])
        for i in range(len(body)):  # 600 ms in all, never 200 ms idle
            await client.send(body[i : i + 1])
            await asyncio.sleep(0.05)
        resp = await client.response()
    assert resp.status == 200
    assert app.requests[0].body == body


async def test_pipelined_body_waiting_behind_a_slow_response_is_not_timed_out(
    sidecar_factory, upstream
):
    async def handler(req: Received, reply: Reply) -> None:
        if req.target == "/slow":
            await asyncio.sleep(0.6)  # three body_idle periods
        await reply.send(200, b"%s %d" % (req.target.encode(), req.body_size))

    sc, app, port = await start(sidecar_factory, upstream, handler, body_idle="200ms")
    body = b"b" * 200_000
    post = b"POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body)
    async with await Client.connect(port) as client:
        await client.send(get("/slow") + post + body[:1000])
        await app.wait_requests(1)
        await client.send(body[1000:])  # while the sidecar holds off reading (pipelining)
        first = await client.response(timeout=3.0)
        second = await client.response(timeout=3.0)
    assert (first.status, first.body) == (200, b"/slow 0")
    assert (second.status, second.body) == (200, b"/big 200000")


async def test_pipelined_head_waiting_behind_a_slow_response_is_not_timed_out(
    sidecar_factory, upstream
):
    async def handler(req: Received, reply: Reply) -> None:
        if req.target == "/slow":
            await asyncio.sleep(0.6)
        await reply.send(200, req.target.encode())

    sc, app, port = await start(sidecar_factory, upstream, handler, header_read="200ms")
    third = get("/c")
    async with await Client.connect(port) as client:
        await client.send(get("/slow") + get("/b") + third[:10])
        await app.wait_requests(1)
        await client.send(third[10:])
        bodies = [(await client.response(timeout=3.0)).body for _ in range(3)]
    assert bodies == [b"/slow", b"/b", b"/c"]


# --- malformed and refused requests --------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost x\r\n\r\n",  # no colon
        b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",  # space before the colon
        b"GET / HTTP/1.1\nHost: x\n\n",  # bare LF line ends
        b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n folded\r\n\r\n",  # obs-fold
        b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n",  # control character
        b"G\x00T / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    ],
)
async def test_malformed_request_is_400_and_nothing_is_forwarded(sidecar_factory, upstream, data):
    sc, app, port = await start(sidecar_factory, upstream)
    resp, closed = await refused(port, data)
    assert resp.status == 400
    assert error_of(resp)["code"] == "BAD_REQUEST"
    assert closed
    assert app.requests == []


async def test_two_host_headers_are_400(sidecar_factory, upstream):
    sc, app, port = await start(sidecar_factory, upstream)
    resp = await request(port, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert resp.status == 400
    assert error_of(resp)["code"] == "BAD_REQUEST"
    assert app.requests == []


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    ],
)
async def test_content_length_with_transfer_encoding_is_400_and_nothing_forwarded(
    sidecar_factory, upstream, framing
):
    sc, app, port = await start(sidecar_factory, upstream)
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"
    data = b"POST / HTTP/1.1\r\nHost: t\r\n" + framing + b"\r\n0\r\n\r\n" + smuggled
    resp, closed = await refused(port, data)
    assert resp.status == 400
    assert error_of(resp)["code"] == "BAD_REQUEST"
    assert closed
    assert app.requests == []


BAD_CHUNKS = [
    b"5;a=b\rc\r\nhello\r\n0\r\n\r\n",  # bare CR inside a chunk extension
    b"2;\rxx\r\n0\r\n\r\n",
    b"5\nhello\r\n0\r\n\r\n",  # bare LF after the chunk size
    b"5\r\nhello\n0\r\n\r\n",  # bare LF after the chunk data
    b"5 \r\nhello\r\n0\r\n\r\n",  # whitespace after the chunk size
    b"-5\r\nhello\r\n0\r\n\r\n",
    b"fffffffffffffffff\r\nhello\r\n0\r\n\r\n",  # chunk size overflow
]
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"
CHUNKED_HEAD = b"POST /first HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("chunks", BAD_CHUNKS)
async def test_bad_chunk_framing_is_refused_and_never_splits_into_two_requests(
    sidecar_factory, upstream, chunks
):
    sc, app, port = await start(sidecar_factory, upstream)
    async with await Client.connect(port) as client:
        await client.send(CHUNKED_HEAD)
        await client.send(chunks + SMUGGLED)
        raw = await client.read_to_eof(timeout=5.0)
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert raw.count(b"HTTP/1.1 ") == 1
    # the first request's body was being buffered when its framing broke: it never reached
    # the app, and the bytes after the bad chunk never became a request of their own
    assert app.requests == []


@pytest.mark.parametrize(
    "data",
    [CHUNKED_HEAD + BAD_CHUNKS[0] + SMUGGLED, CHUNKED_HEAD + BAD_CHUNKS[2] + SMUGGLED],
)
async def test_framing_error_right_after_the_head_closes_the_connection(
    sidecar_factory, upstream, data
):
    sc, app, port = await start(sidecar_factory, upstream)
    async with await Client.connect(port) as client:
        await client.send(data)
        raw, closed = await client.read_for(1.0)
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert raw.count(b"HTTP/1.1 ") == 1
    assert all(r.target != "/smuggled" for r in app.requests)
    assert closed, "the sidecar said connection: close but kept the connection open"


async def test_chunk_extensions_are_bounded_even_when_the_request_comes_in_one_read(
    sidecar_factory, upstream
):
    sc, app, port = await start(sidecar_factory, upstream)  # header_bytes: 4096
    async with await Client.connect(port) as client:
        await client.send(CHUNKED_HEAD + b"5;" + b"e" * 8000 + b"\r\nhello\r\n0\r\n\r\n")
        resp = await client.response()
    assert resp.status == 413
    assert "chunk extensions" in error_of(resp)["message"]


async def test_a_large_body_then_a_pipelined_chunked_request_is_not_framing_overhead(
    sidecar_factory, upstream
):
    # the end of one request's 64 KiB body and the whole of the next (chunked) request in
    # one read: only the second's chunk-size lines are framing, never the first's body
    sc, app, port = await start(sidecar_factory, upstream)
    body = b"x" * (64 << 10)
    async with await Client.connect(port) as client:
        await client.send(b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body))
        await client.send(body + CHUNKED_HEAD + b"5\r\nhello\r\n0\r\n\r\n")
        first, second = await client.response(), await client.response()
    assert (first.status, second.status) == (200, 200)
    assert [r.body_size for r in app.requests] == [len(body), 5]


@pytest.mark.parametrize("coding", [b"gzip", b"identity", b"chunked;q=1, gzip"])
async def test_transfer_encoding_not_ending_in_chunked_is_400_and_never_forwarded(
    sidecar_factory, upstream, coding
):
    sc, app, port = await start(sidecar_factory, upstream)
    data = b"POST /te HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: " + coding + b"\r\n\r\nhello"
    async with await Client.connect(port) as client:
        await client.send(data)
        raw, closed = await client.read_for(1.0)
    # RFC 9112 6.3: the length cannot be determined; 400 and close
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert closed
    assert app.requests == []


@pytest.mark.parametrize(
    "data",
    [
        b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        # (an HTTP/2 offer, `Upgrade: h2c` alone, is served in HTTP/1.1: test_h2c_offer.py)
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    ],
)
async def test_upgrade_and_connect_are_501(sidecar_factory, upstream, data):
    sc, app, port = await start(sidecar_factory, upstream)
    resp, closed = await refused(port, data)
    assert resp.status == 501
    assert error_of(resp)["code"] == "NOT_IMPLEMENTED"
    assert closed
    assert app.requests == []
