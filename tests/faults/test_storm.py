"""A connection storm: 3000 concurrent connections to the inbound listener with a slow (held)
app behind it. No crash, bounded memory, 503 POOL_EXHAUSTED past the pool caps without waiting
for the app, and normal requests succeed afterwards."""

from __future__ import annotations

import asyncio
import resource
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.faults.procs import start_sidecar, write_config
from tests.faults.util import hwm_kib, metric, rss_kib, scrape, wait_until

STORM = 3000
MAX_CONNECTIONS, MAX_PENDING = 20, 100
# Per client connection the sidecar holds a transport, a parser and a request's bookkeeping:
# a few KiB (about 5 KiB measured). 16 KiB each (47 MiB for 3000) leaves room for allocator
# slack, yet a per-connection buffer of a socket's size or a leak would blow it. The baseline
# (after one warm-up request) is measured first.
PER_CONNECTION_KIB = 16


def raise_nofile(pid: int | None, n: int) -> None:
    if pid is None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < n:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))
        return
    assert shutil.which("prlimit"), "prlimit (util-linux) is required"
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={n}:{n}"], check=True)


async def one(port: int, statuses: Counter[str], codes: Counter[str]) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        statuses[f"connect:{type(exc).__name__}"] += 1
        return
    try:
        writer.write(b"GET /slow HTTP/1.1\r\nHost: app\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
        statuses[head.split(b" ", 2)[1].decode()] += 1
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"x-gts-sidecar-error:"):
                codes[line.split(b":", 1)[1].strip().decode()] += 1
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        statuses[f"error:{type(exc).__name__}"] += 1
    finally:
        writer.transport.abort()


async def test_connection_storm(tmp_path: Path, aiohttp_server: Any) -> None:
    raise_nofile(None, STORM + 1000)
    release = asyncio.Event()
    held = 0

    async def handle(request: web.Request) -> web.Response:
        nonlocal held
        if request.path == "/slow":
            held += 1
            await release.wait()
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = await aiohttp_server(app)
    cfg = {
        "app": {
            "url": f"http://127.0.0.1:{server.port}",
            "timeouts": {"response_header": "50s", "total": "55s"},
            "pool": {
                "max_connections": MAX_CONNECTIONS,
                "max_idle": MAX_CONNECTIONS,
                "max_pending": MAX_PENDING,
            },
        }
    }
    sc = await start_sidecar(write_config(tmp_path / "sidecar.yaml", cfg))
    port = sc.ports["inbound"]
    statuses: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    try:
        raise_nofile(sc.proc.pid, STORM + 1000)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/warm") as r:
                assert r.status == 200
            baseline = rss_kib(sc.proc.pid)

            clients = [asyncio.ensure_future(one(port, statuses, codes)) for _ in range(STORM)]
            refused = STORM - MAX_CONNECTIONS - MAX_PENDING
            # past the caps: 503 at once, while the app still holds every admitted request
            await wait_until(lambda: codes["POOL_EXHAUSTED"] >= refused, timeout=60,
                             what=lambda: (statuses, codes))  # fmt: skip
            # every pooled connection reaches the app (the test's loop also runs the clients)
            await wait_until(lambda: held == MAX_CONNECTIONS, timeout=30, what=lambda: held)
            assert held == MAX_CONNECTIONS  # and not one more
            text = await scrape(s, sc.ports["admin"])
            assert metric(text, "gts_sidecar_pool_requests_waiting") == MAX_PENDING
            assert metric(text, "gts_sidecar_pool_exhausted_total") == refused
            assert statuses == Counter({"503": refused}), statuses
            peak = hwm_kib(sc.proc.pid)

            release.set()
            await asyncio.wait_for(asyncio.gather(*clients), 60)
            assert statuses == Counter({"503": refused, "200": MAX_CONNECTIONS + MAX_PENDING})
            assert codes == Counter({"POOL_EXHAUSTED": refused})

            assert sc.proc.returncode is None
            bound = baseline + STORM * PER_CONNECTION_KIB
            peak = max(peak, hwm_kib(sc.proc.pid))
            assert peak < bound, f"peak RSS {peak} KiB over {bound} KiB (baseline {baseline})"
            for _ in range(5):
                async with s.get(f"http://127.0.0.1:{port}/after") as r:
                    assert r.status == 200 and await r.text() == "hello"
            print(f"baseline {baseline} KiB, peak {peak} KiB, now {rss_kib(sc.proc.pid)} KiB")
    finally:
        release.set()
        await sc.stop()
