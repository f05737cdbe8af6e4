"""Large bodies stream both ways with bounded memory: 512 MiB up through the inbound listener
to an app that discards it, 256 MiB back; the sidecar's peak RSS stays near its baseline."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.faults.procs import start_sidecar, write_config
from tests.faults.util import hwm_kib, rss_kib

MIB = 1024 * 1024
UP, DOWN = 512 * MIB, 256 * MIB
CHUNK = bytes(range(256)) * 4096  # 1 MiB, not all zeros
# Streaming with back-pressure keeps a few socket buffers' worth in flight (~MiBs). 64 MiB over
# the baseline allows for allocator slack yet is an eighth of the smallest body: buffering a
# body whole would blow it.
BOUND_KIB = 64 * 1024


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_large_bodies_stream_with_bounded_memory(
    tmp_path: Path, aiohttp_server: Any, framing: str
) -> None:
    got: dict[str, Any] = {}

    async def upload(request: web.Request) -> web.Response:
        h, n = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(MIB):
            n += len(chunk)
            h.update(chunk)
        got["n"], got["sha"] = n, h.hexdigest()
        return web.json_response({"received": n})

    async def download(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = DOWN
        await resp.prepare(request)
        for _ in range(DOWN // MIB):
            await resp.write(CHUNK)
        return resp

    app = web.Application(client_max_size=UP * 2)
    app.router.add_post("/upload", upload)
    app.router.add_get("/download", download)
    server = await aiohttp_server(app)
    cfg = {
        "app": {
            "url": f"http://127.0.0.1:{server.port}",
            "timeouts": {"response_header": "100s", "total": "110s"},
        }
    }
    sc = await start_sidecar(write_config(tmp_path / "sidecar.yaml", cfg))
    base = f"http://127.0.0.1:{sc.ports['inbound']}"
    timeout = aiohttp.ClientTimeout(total=120)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as s:
            async with s.get(base + "/upload") as r:
                assert r.status == 405  # warm up: pools, parsers
            baseline = rss_kib(sc.proc.pid)

            async def body() -> AsyncIterator[bytes]:
                for _ in range(UP // MIB):
                    yield CHUNK

            want = hashlib.sha256()
            for _ in range(UP // MIB):
                want.update(CHUNK)
            headers = {"Content-Length": str(UP)} if framing == "content-length" else {}
            async with s.post(base + "/upload", data=body(), headers=headers) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["received"] == UP
            assert got == {"n": UP, "sha": want.hexdigest()}  # every byte, in order

            h, n = hashlib.sha256(), 0
            async with s.get(base + "/download") as r:
                assert r.status == 200
                async for chunk in r.content.iter_chunked(MIB):
                    n += len(chunk)
                    h.update(chunk)
            assert n == DOWN
            expect = hashlib.sha256()
            for _ in range(DOWN // MIB):
                expect.update(CHUNK)
            assert h.hexdigest() == expect.hexdigest()

            peak = hwm_kib(sc.proc.pid)
            print(f"baseline {baseline} KiB, peak {peak} KiB")
            assert peak - baseline < BOUND_KIB, f"peak {peak} KiB, baseline {baseline} KiB"
    finally:
        await sc.stop()
