"""Hostile upstream responses (issue 12, F8), over real loopback sockets: the response head
is validated before anything reaches the client (status 100-599, no protocol switch, no
transfer coding but one `chunked`, bounded size and field count)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.component.servers import Received, Reply, UpstreamFactory, error_of, get, request


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamFactory]:
    factory = UpstreamFactory()
    yield factory
    await factory.close()


def raw(head: bytes, body: bytes = b""):
    async def handler(req: Received, reply: Reply) -> None:
        reply.write(head + body)
        await reply.drain()
        reply.close()

    return handler


async def start(sidecar_factory: Any, upstream: UpstreamFactory, handler: Any, **app: Any):
    up = await upstream(handler)
    sc = await sidecar_factory({"app": {"url": up.url, **app}})
    return sc, up, sc.ports["inbound"]


def assert_no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


@pytest.mark.parametrize("status", [b"099", b"000", b"600", b"999"])
async def test_a_status_outside_100_to_599_is_502_and_never_relayed(
    sidecar_factory, upstream, caplog, status
):
    sc, up, port = await start(
        sidecar_factory,
        upstream,
        raw(b"HTTP/1.1 " + status + b" Odd\r\nContent-Length: 2\r\n\r\n", b"hi"),
    )
    resp = await request(port, get("/"))
    assert resp.status == 502
    err = error_of(resp)
    assert err["code"] == "UPSTREAM_UNAVAILABLE"
    assert f"status {status.decode()}" in err["message"]
    assert_no_errors_logged(caplog)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ],
)
async def test_a_protocol_switch_is_a_clear_502_without_a_traceback(
    sidecar_factory, upstream, caplog, head
):
    sc, up, port = await start(sidecar_factory, upstream, raw(head, b"\x81\x05hello"))
    for _ in range(3):  # and again: nothing is left behind per request
        resp = await request(port, get("/ws"))
        assert resp.status == 502
        assert "101" in error_of(resp)["message"]
    assert_no_errors_logged(caplog)


@pytest.mark.parametrize(
    "coding", [b"gzip", b"gzip, chunked", b"identity", b"chunked, chunked", b"x-custom"]
)
async def test_a_transfer_coding_other_than_chunked_is_refused(
    sidecar_factory, upstream, caplog, coding
):
    body = b"\x1f\x8b\x08\x00compressed"
    sc, up, port = await start(
        sidecar_factory,
        upstream,
        raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n", body),
    )
    resp = await request(port, get("/"))
    assert resp.status == 502
    assert "Transfer-Encoding" in error_of(resp)["message"]
    assert_no_errors_logged(caplog)


async def test_chunked_and_interim_responses_still_pass(sidecar_factory, upstream):
    head = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n"
    )
    sc, up, port = await start(sidecar_factory, upstream, raw(head, b"2\r\nok\r\n0\r\n\r\n"))
    resp = await request(port, get("/"))
    assert resp.status == 200
    assert resp.body == b"ok"


async def test_too_many_response_fields_are_refused(sidecar_factory, upstream, caplog):
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(50_000))
    sc, up, port = await start(
        sidecar_factory,
        upstream,
        raw(b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 0\r\n\r\n"),
    )
    resp = await request(port, get("/"))
    assert resp.status == 502
    assert "more than 100 header fields" in error_of(resp)["message"]
    assert_no_errors_logged(caplog)


@pytest.mark.parametrize("size", [20_000, 4 << 20])
async def test_an_oversized_response_head_is_refused(sidecar_factory, upstream, caplog, size):
    sc, up, port = await start(
        sidecar_factory,
        upstream,
        raw(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * size + b"\r\nContent-Length: 0\r\n\r\n"),
    )
    resp = await request(port, get("/"))
    assert resp.status == 502
    assert "response_limits" in error_of(resp)["message"]
    assert_no_errors_logged(caplog)


async def test_response_limits_are_configurable(sidecar_factory, upstream):
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(150))
    sc, up, port = await start(
        sidecar_factory,
        upstream,
        raw(b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 2\r\n\r\n", b"ok"),
        response_limits={"header_count": 200},
    )
    resp = await request(port, get("/"))
    assert resp.status == 200
    assert resp.get("X-F149") == "v"
