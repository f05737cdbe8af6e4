"""100 MB through the inbound listener, both ways, without the sidecar holding it whole.

The client, the sidecar and the app all run in this process, so the peak resident set of the
process bounds what the sidecar buffered: bodies are generated and hashed in 1 MiB pieces on
both ends, and the peak RSS (VmHWM reset before the transfer, and VmRSS sampled during it)
may grow by far less than the body. Two more tests check the flow control behind that: a
reader that stops, and a body waiting for a pooled connection, hold the sender back.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.component.servers import Client, Received, Reply, UpstreamFactory, wait_until

MiB = 1 << 20
SIZE = 100 * MiB
PIECE = MiB
#: peak RSS growth allowed while 100 MB pass through
MAX_GROWTH = 50 * MiB

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="needs /proc to measure RSS"
)

_BASE = os.urandom(PIECE)


def piece(i: int) -> bytes:
    """The i-th 1 MiB piece of the test body: distinct per index, cheap to make."""
    return i.to_bytes(8, "big") + _BASE[8:]


def body_sha256(size: int) -> str:
    sha = hashlib.sha256()
    for i in range(size // PIECE):
        sha.update(piece(i))
    return sha.hexdigest()


def _status_bytes(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    assert m is not None
    return int(m.group(1)) * 1024


class PeakRss:
    """Peak resident memory during a block, relative to its start."""

    def __init__(self) -> None:
        self.start = 0
        self.sampled_peak = 0
        self.hwm_peak = 0
        self.hwm_reset = False

    @property
    def growth(self) -> int:
        peak = max(self.sampled_peak, self.hwm_peak if self.hwm_reset else 0)
        return peak - self.start


async def _sampler(peak: PeakRss) -> None:
    while True:
        peak.sampled_peak = max(peak.sampled_peak, _status_bytes("VmRSS"))
        await asyncio.sleep(0.01)


@asynccontextmanager
async def measure_rss() -> AsyncIterator[PeakRss]:
    """Samples VmRSS every 10 ms and, where the kernel allows resetting it, reads VmHWM."""
    peak = PeakRss()
    try:
        # reset VmHWM to the current RSS (Linux >= 4.0), so an earlier peak cannot hide
        Path("/proc/self/clear_refs").write_text("5")
        peak.hwm_reset = True
    except OSError:
        pass
    peak.start = _status_bytes("VmRSS")
    task = asyncio.ensure_future(_sampler(peak))
    try:
        yield peak
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        peak.sampled_peak = max(peak.sampled_peak, _status_bytes("VmRSS"))
        if peak.hwm_reset:
            peak.hwm_peak = _status_bytes("VmHWM")


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamFactory]:
    factory = UpstreamFactory()
    yield factory
    await factory.close()


async def test_100mb_upload_streams_through(sidecar_factory, upstream):
    async def handler(req: Received, reply: Reply) -> None:
        await reply.send(200, f"{req.body_size} {req.body_sha256}".encode())

    app = await upstream(handler, keep=0)
    sc = await sidecar_factory({"app": {"url": app.url}})
    expected = body_sha256(SIZE)
    async with measure_rss() as peak, await Client.connect(sc.ports["inbound"]) as client:
        started = time.monotonic()
        await client.send(b"PUT /upload HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % SIZE)
        for i in range(SIZE // PIECE):
            await client.send(piece(i))
        resp = await client.response(timeout=30.0)
        elapsed = time.monotonic() - started
    assert resp.status == 200
    assert resp.body == f"{SIZE} {expected}".encode()
    assert app.requests[0].get("content-length") == str(SIZE)
    assert peak.growth < MAX_GROWTH, f"peak RSS grew {peak.growth / MiB:.1f} MiB"
    assert elapsed < 30.0


async def test_100mb_chunked_upload_streams_through(sidecar_factory, upstream):
    async def handler(req: Received, reply: Reply) -> None:
        await reply.send(200, f"{req.body_size} {req.body_sha256}".encode())

    app = await upstream(handler, keep=0)
    sc = await sidecar_factory({"app": {"url": app.url}})
    expected = body_sha256(SIZE)
    async with measure_rss() as peak, await Client.connect(sc.ports["inbound"]) as client:
        await client.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(SIZE // PIECE):
            await client.send(b"%x\r\n%s\r\n" % (PIECE, piece(i)))
        await client.send(b"0\r\n\r\n")
        resp = await client.response(timeout=30.0)
    assert resp.status == 200
    assert resp.body == f"{SIZE} {expected}".encode()
    assert app.requests[0].framing == "chunked"
    assert peak.growth < MAX_GROWTH, f"peak RSS grew {peak.growth / MiB:.1f} MiB"


@pytest.mark.parametrize("chunked", [False, True])
async def test_100mb_download_streams_through(sidecar_factory, upstream, chunked):
    async def handler(req: Received, reply: Reply) -> None:
        if chunked:
            reply.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        else:
            reply.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % SIZE)
        for i in range(SIZE // PIECE):
            data = piece(i)
            reply.write(b"%x\r\n%s\r\n" % (PIECE, data) if chunked else data)
            await reply.drain()
        if chunked:
            reply.write(b"0\r\n\r\n")
        await reply.drain()

    app = await upstream(handler)
    sc = await sidecar_factory({"app": {"url": app.url}})
    expected = body_sha256(SIZE)
    async with measure_rss() as peak, await Client.connect(sc.ports["inbound"]) as client:
        await client.send(b"GET /download HTTP/1.1\r\nHost: t\r\n\r\n")
        resp = await client.response(timeout=30.0, sink=lambda data: None)
    assert resp.status == 200
    assert resp.framing == ("chunked" if chunked else "content-length")
    assert resp.body_size == SIZE
    assert resp.body_sha256 == expected
    assert peak.growth < MAX_GROWTH, f"peak RSS grew {peak.growth / MiB:.1f} MiB"


async def test_body_waiting_for_a_pooled_connection_is_not_read_ahead(sidecar_factory, upstream):
    """While a request waits in the pool queue, the sidecar holds at most a small prebuffer
    of its body and stops reading: the client cannot push the whole body into it."""

    async def handler(req: Received, reply: Reply) -> None:
        await reply.upstream.gate.wait()
        await reply.send(200, f"{req.body_size} {req.body_sha256}".encode())

    size = 64 * MiB
    app = await upstream(handler, keep=0)
    sc = await sidecar_factory(
        {"upstreams": {"up": {"url": app.url, "pool": {"max_connections": 1, "max_idle": 1}}}}
    )
    port = sc.ports["outbound"]
    async with await Client.connect(port) as holder, await Client.connect(port) as uploader:
        await holder.send(b"GET /up/hold HTTP/1.1\r\nHost: t\r\n\r\n")
        await wait_until(lambda: app.in_flight == 1)
        await uploader.send(b"PUT /up/big HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
        sent = 0

        async def push() -> None:
            nonlocal sent
            for i in range(size // PIECE):
                await uploader.send(piece(i))
                sent += PIECE

        pusher = asyncio.ensure_future(push())
        try:
            # wait until the client can push no more (or, if the sidecar reads ahead without
            # bound, until it has pushed everything)
            last = -1
            while sent != last and sent < size:
                last = sent
                await asyncio.sleep(0.2)
            assert sent < size // 2, f"the sidecar read {sent / MiB:.0f} MiB ahead"
            app.gate.set()
            assert (await holder.response()).status == 200
            resp = await uploader.response(timeout=30.0)
            await pusher
        finally:
            pusher.cancel()
    assert resp.status == 200
    assert resp.body == f"{size} {body_sha256(size)}".encode()


async def test_a_client_that_stops_reading_stops_the_app_download(sidecar_factory, upstream):
    """Back-pressure: when the client stops reading, the sidecar stops reading the app, so
    the app's writes block instead of the body piling up in the sidecar."""
    size = 64 * MiB
    sent = 0

    async def handler(req: Received, reply: Reply) -> None:
        nonlocal sent
        reply.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for i in range(size // PIECE):
            reply.write(piece(i))
            await reply.drain()
            sent += PIECE

    app = await upstream(handler)
    sc = await sidecar_factory({"app": {"url": app.url}})
    async with await Client.connect(sc.ports["inbound"]) as client:
        await client.send(b"GET /download HTTP/1.1\r\nHost: t\r\n\r\n")
        await wait_until(lambda: sent > 0)
        # the client reads nothing now: wait until the app can push no more (or, without
        # back-pressure, until it has pushed everything)
        last = -1
        while sent != last and sent < size:
            last = sent
            await asyncio.sleep(0.2)
        assert sent < size // 2, f"the sidecar read {sent / MiB:.0f} MiB ahead of its client"
        resp = await client.response(timeout=30.0, sink=lambda data: None)
    assert resp.status == 200
    assert resp.body_size == size
    assert resp.body_sha256 == body_sha256(size)
