"""HTTP/2 attacks on the proxy listeners, each as the frames an attacker sends: rapid reset
(CVE-2023-44487), CONTINUATION flood (2024), HPACK bomb, PING / SETTINGS / empty-DATA floods
(CVE-2019-9512/9515/9518), a flow-control window held at zero, more streams than allowed.
Each must end in a GOAWAY or a reset, with the app untouched (or freed), not in unbounded
work or memory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import h2.errors
import h2.events
import h2.settings
import hpack
import pytest
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, PingFrame, SettingsFrame

from sidecar.proxy.downstream import H2_PREFACE as PREFACE
from tests.component.h2client import H2Client
from tests.component.servers import (
    Client,
    Received,
    Reply,
    UpstreamFactory,
    get,
    request,
    sample,
)

ENHANCE_YOUR_CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamFactory]:
    factory = UpstreamFactory()
    yield factory
    await factory.close()


def abuse(sc: Any, reason: str = "h2_abuse") -> float:
    return sample(sc, "gts_sidecar_client_errors_total", listener="inbound", reason=reason)


async def raw_h2(port: int) -> Client:
    """A connection that has sent the preface and an empty SETTINGS (nothing else)."""
    client = await Client.connect(port)
    await client.send(PREFACE + SettingsFrame(0).serialize())
    return client


def frames_of(data: bytes) -> list[tuple[int, bytes]]:
    out, at = [], 0
    while at + 9 <= len(data):
        length = int.from_bytes(data[at : at + 3], "big")
        out.append((data[at + 3], data[at + 9 : at + 9 + length]))
        at += 9 + length
    return out


def goaway_code(data: bytes) -> int | None:
    for kind, payload in frames_of(data):
        if kind == 0x7:
            return int.from_bytes(payload[4:8], "big")
    return None


def request_block(encoder: hpack.Encoder, path: str = "/", extra: list[Any] = ()) -> bytes:  # type: ignore[assignment]
    return encoder.encode(
        [(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", path), *extra]
    )


async def test_rapid_reset_is_cut_off_with_enhance_your_calm(sidecar_factory, upstream):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    client = await H2Client.connect(sc.ports["inbound"])
    try:
        for _ in range(400):
            stream = client.conn.get_next_available_stream_id()
            client.conn.send_headers(
                stream,
                [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"),
                 (b":path", b"/r")],
                end_stream=True,
            )  # fmt: skip
            client.conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
        await client.flush()
        while await client.pump(10):
            pass
    except (ConnectionError, h2.exceptions.ProtocolError):
        pass
    finally:
        client.close()
    assert client.terminated is not None
    assert client.terminated.error_code == ENHANCE_YOUR_CALM
    assert abuse(sc) == 1
    # far fewer upstream requests than the 400 opened
    assert len(app.requests) <= 250
    assert (await request(sc.ports["inbound"], get("/after"))).status == 200


async def test_a_continuation_flood_is_cut_off(sidecar_factory, upstream):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    client = await raw_h2(sc.ports["inbound"])
    try:
        encoder = hpack.Encoder()
        head = HeadersFrame(1, data=request_block(encoder, "/c"))  # no END_HEADERS
        await client.send(head.serialize())
        sent = 0
        junk = ContinuationFrame(1, data=b"\x00" * 16_000).serialize()
        with pytest.raises(ConnectionError):
            while sent < 64 << 20:  # it must stop us long before 64 MiB
                await client.send(junk)
                sent += len(junk)
        data = await client.read_to_eof()
    finally:
        client.close()
    # (what the client managed to send is what loopback buffers took before the close; the
    # GOAWAY itself may be lost to the reset that closing on unread input makes)
    assert abuse(sc) == 1
    assert data == b"" or goaway_code(data) == ENHANCE_YOUR_CALM
    assert app.requests == []


async def test_an_hpack_bomb_past_the_header_list_limit_is_refused(sidecar_factory, upstream):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    client = await raw_h2(sc.ports["inbound"])
    try:
        encoder = hpack.Encoder()
        # one 4 KB field in the dynamic table, then referenced a thousand times: a few KB on
        # the wire, 4 MB decoded
        block = request_block(encoder, "/bomb", [("x-bomb", "b" * 4000)] * 1000)
        assert len(block) < 16_000
        await client.send(
            HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize()
        )
        data = await client.read_to_eof()
    finally:
        client.close()
    assert goaway_code(data) is not None
    assert app.requests == []


@pytest.mark.parametrize("kind", ["ping", "settings", "empty-data"])
async def test_control_frame_floods_are_cut_off(sidecar_factory, upstream, kind):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    client = await raw_h2(sc.ports["inbound"])
    try:
        if kind == "ping":
            frame = PingFrame(0, opaque_data=b"12345678").serialize()
        elif kind == "settings":
            frame = SettingsFrame(
                0, settings={h2.settings.SettingCodes.MAX_FRAME_SIZE: 16384}
            ).serialize()
        else:
            encoder = hpack.Encoder()
            block = encoder.encode(
                [(":method", "POST"), (":scheme", "http"), (":authority", "a"), (":path", "/e")]
            )
            await client.send(HeadersFrame(1, data=block, flags=["END_HEADERS"]).serialize())
            frame = DataFrame(1, data=b"").serialize()
        try:
            await client.send(frame * 3000)
        except ConnectionError:
            pass
        data = await client.read_to_eof()
    finally:
        client.close()
    assert goaway_code(data) == ENHANCE_YOUR_CALM
    assert abuse(sc) == 1


async def test_a_window_held_at_zero_resets_the_stream_and_frees_the_upstream(
    sidecar_factory, upstream
):
    big = b"w" * (1 << 20)

    async def large(req: Received, reply: Reply) -> None:
        await reply.send(200, big if req.target == "/big" else b"small")

    app = await upstream(large)
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
    client = await H2Client.connect(sc.ports["inbound"])
    try:
        # the client takes the first 64 KiB window and never opens it again
        client._handle = lambda event: (  # type: ignore[method-assign]
            client.responses[event.stream_id].__setattr__("reset", event.error_code)
            if isinstance(event, h2.events.StreamReset)
            else None
        )
        stream = await client.send_request("/big")
        for _ in range(200):
            if client.responses[stream].reset is not None:
                break
            await client.pump(10)
        assert client.responses[stream].reset == h2.errors.ErrorCodes.CANCEL
    finally:
        client.close()
    assert abuse(sc, "slow_read") == 1
    # the app's one pooled connection was given up: the next request gets it
    assert (await request(sc.ports["inbound"], get("/small"))).status == 200


async def test_more_streams_than_allowed_end_the_connection(sidecar_factory, upstream):
    release = asyncio.Event()

    async def held(req: Received, reply: Reply) -> None:
        await release.wait()
        await reply.send(200, b"ok")

    app = await upstream(held)
    sc = await sidecar_factory(
        {
            "app": {"url": app.url},
            "listeners": {"inbound": {"clients": {"max_concurrent_streams": 2}}},
        }
    )
    client = await raw_h2(sc.ports["inbound"])
    try:
        encoder = hpack.Encoder()
        for stream_id in (1, 3, 5):
            block = request_block(encoder, f"/s{stream_id}")
            await client.send(
                HeadersFrame(stream_id, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize()
            )
        data = await client.read_to_eof()
    finally:
        release.set()
        client.close()
    assert goaway_code(data) is not None
    assert len(app.requests) <= 2
