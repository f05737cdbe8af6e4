"""Malformed HTTP/2 requests (RFC 9113 section 8.2-8.3) are refused before the app: what an
HTTP/2 -> HTTP/1.1 translation would otherwise pass on as framing or as a second request
(CR/LF/NUL in a value, uppercase or odd characters in a name, connection-specific fields,
transfer-encoding, a content-length that disagrees with the DATA), and heads HTTP/2 forbids
(pseudo-header fields missing, repeated, unknown or after a regular field; an empty :path;
no authority; Host disagreeing with :authority). Each is a GOAWAY(PROTOCOL_ERROR), the
connection closed, counted as an `h2_protocol` client error, and nothing at the app.

Each case is sent as a raw HEADERS frame from hpack's own encoder, which sends what it is
given (a client library would refuse to)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import h2.errors
import hpack
import pytest
from hyperframe.frame import DataFrame, HeadersFrame, SettingsFrame

from sidecar.proxy.downstream import H2_PREFACE as PREFACE
from tests.component.servers import Client, UpstreamFactory, sample

PROTOCOL_ERROR = h2.errors.ErrorCodes.PROTOCOL_ERROR
BASE = [(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", "/x")]


def without(name: str) -> list[tuple[str, str]]:
    return [f for f in BASE if f[0] != name]


CASES: dict[str, list[Any]] = {
    "uppercase name": [*BASE, ("X-Upper", "1")],
    "CR in a value": [*BASE, ("x-a", "a\rGET /smuggled HTTP/1.1")],
    "LF in a value": [*BASE, ("x-a", "a\nx-b: 1")],
    "NUL in a value": [*BASE, ("x-a", "a\x00b")],
    "space in a name": [*BASE, ("x a", "1")],
    "colon in a name": [*BASE, ("x:a", "1")],
    "DEL in a name": [*BASE, ("x\x7fa", "1")],
    "empty name": [*BASE, ("", "1")],
    "value with leading space": [*BASE, ("x-a", " 1")],
    "value with trailing tab": [*BASE, ("x-a", "1\t")],
    "transfer-encoding": [*BASE, ("transfer-encoding", "chunked")],
    "connection": [*BASE, ("connection", "close")],
    "keep-alive": [*BASE, ("keep-alive", "timeout=5")],
    "proxy-connection": [*BASE, ("proxy-connection", "keep-alive")],
    "upgrade": [*BASE, ("upgrade", "h2c")],
    "te other than trailers": [*BASE, ("te", "gzip")],
    "pseudo after a regular field": [*BASE[:3], ("x-a", "1"), BASE[3]],
    "repeated :path": [*BASE, (":path", "/y")],
    "unknown pseudo field": [*BASE, (":foo", "1")],
    ":status in a request": [*BASE, (":status", "200")],
    ":protocol without CONNECT": [*BASE, (":protocol", "websocket")],
    "no :method": without(":method"),
    "no :scheme": without(":scheme"),
    "no :path": without(":path"),
    "empty :path": [*without(":path"), (":path", "")],
    "no :authority or host": without(":authority"),
    "host disagreeing with :authority": [*BASE, ("host", "b")],
    "two host fields": [*without(":authority"), ("host", "a"), ("host", "a")],
}


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamFactory]:
    factory = UpstreamFactory()
    yield factory
    await factory.close()


def goaway_code(data: bytes) -> int | None:
    at = 0
    while at + 9 <= len(data):
        length = int.from_bytes(data[at : at + 3], "big")
        if data[at + 3] == 0x7:
            return int.from_bytes(data[at + 13 : at + 17], "big")
        at += 9 + length
    return None


async def refused(sc: Any, frames: list[Any]) -> int | None:
    """Send the frames after the preface; the GOAWAY's error code once the sidecar closes."""
    client = await Client.connect(sc.ports["inbound"])
    try:
        await client.send(PREFACE + SettingsFrame(0).serialize())
        await client.send(b"".join(frame.serialize() for frame in frames))
        return goaway_code(await client.read_to_eof())
    finally:
        client.close()


@pytest.mark.parametrize("case", list(CASES))
async def test_a_malformed_request_head_is_a_protocol_error(sidecar_factory, upstream, case):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    block = hpack.Encoder().encode(CASES[case])
    code = await refused(sc, [HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"])])
    assert code == PROTOCOL_ERROR
    assert app.requests == []
    assert sample(sc, "gts_sidecar_client_errors_total", listener="inbound", reason="h2_protocol")


@pytest.mark.parametrize("sent", [b"12345", b"x" * 20])
async def test_a_content_length_that_disagrees_with_the_data_is_a_protocol_error(
    sidecar_factory, upstream, sent
):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    head = [(":method", "POST"), *BASE[1:], ("content-length", "10")]
    block = hpack.Encoder().encode(head)
    code = await refused(
        sc,
        [
            HeadersFrame(1, data=block, flags=["END_HEADERS"]),
            DataFrame(1, data=sent, flags=["END_STREAM"]),
        ],
    )
    assert code == PROTOCOL_ERROR
    assert app.requests == []


async def test_a_well_formed_head_with_the_same_encoder_reaches_the_app(sidecar_factory, upstream):
    """The control: the raw frames above are refused for their fields, not their framing."""
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    block = hpack.Encoder().encode([*BASE, ("te", "trailers"), ("x-a", "a b")])
    client = await Client.connect(sc.ports["inbound"])
    try:
        await client.send(PREFACE + SettingsFrame(0).serialize())
        await client.send(
            HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize()
        )
        await app.wait_requests(1)
    finally:
        client.close()
    assert app.requests[0].target == "/x"
    assert app.requests[0].get("x-a") == "a b"
