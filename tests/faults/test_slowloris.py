"""Slowloris: slowhttptest (slow headers, slow bodies, slow readers) against the inbound
listener, with twice as many slow clients of each kind as the app has pooled connections,
while normal requests keep succeeding: slow heads are cut by header_read, slow bodies are
buffered (they never take a pooled connection) and cut by the minimum data rate (408), slow
readers are cut by the same rate, freeing the connection their response came from."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.faults.procs import start_sidecar, write_config
from tests.faults.util import hwm_kib, metric, require_tool, rss_kib, scrape

HEADER_READ, BODY_IDLE = 1.0, 1.0
MARGIN = 4.0
BIG = b"z" * (4 * 1024 * 1024)
POOL = 25
SLOW_READERS = 2 * POOL
# Slow readers (slowhttptest -X: tiny TCP windows, reading a few bytes a second) of a 4 MiB
# response: with back-pressure the sidecar holds about a socket buffer per connection, not
# the response; buffering them would take 50 x 4 MiB. 48 MiB over the baseline is the bound.
SLOW_READ_BOUND_KIB = 48 * 1024


async def test_slow_clients_are_cut_or_held_cheaply_while_normal_requests_succeed(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    slowhttptest = require_tool("slowhttptest", "slowhttptest")

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        if request.path == "/big":
            return web.Response(body=BIG)
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = await aiohttp_server(app)
    cfg = {
        "app": {
            "url": f"http://127.0.0.1:{server.port}",
            "pool": {"max_connections": POOL, "max_idle": POOL},
        },
        "listeners": {
            "inbound": {
                "bind": "127.0.0.1:0",
                "timeouts": {"header_read": "1s", "body_idle": "1s", "keepalive": "5s"},
                "clients": {"min_rate_bytes": "1KiB", "min_rate_window": "1s"},
            },
            **{n: {"bind": "127.0.0.1:0"} for n in ("outbound", "api", "peer", "admin")},
        },
    }
    sc = await start_sidecar(write_config(tmp_path / "sidecar.yaml", cfg))
    port = sc.ports["inbound"]
    loop = asyncio.get_running_loop()
    attackers: list[asyncio.subprocess.Process] = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            # one slow-header connection by hand: the 408 itself, within header_read + margin
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            t0 = loop.time()
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
            answer = await asyncio.wait_for(reader.read(-1), HEADER_READ + MARGIN)
            assert answer.startswith(b"HTTP/1.1 408 ")
            assert b"x-gts-sidecar-error: REQUEST_TIMEOUT" in answer
            assert loop.time() - t0 >= HEADER_READ * 0.9
            writer.close()

            baseline = rss_kib(sc.proc.pid)
            common = ["-c", str(6 * POOL), "-r", "150", "-i", "2", "-l", "6", "-p", "3"]
            url = f"http://127.0.0.1:{port}/"
            slow_read = ["-X", "-c", str(SLOW_READERS), "-r", "100", "-l", "6", "-p", "3"]
            slow_read += ["-w", "1", "-y", "64", "-n", "1", "-z", "32", "-k", "1"]
            for args in (
                ["-H", *common, "-u", url],
                ["-B", "-s", "8192", *common, "-u", url],
                [*slow_read, "-u", url + "big"],
            ):
                attackers.append(
                    await asyncio.create_subprocess_exec(
                        slowhttptest,
                        *args,
                        stdout=asyncio.subprocess.PIPE,
                        stderr=asyncio.subprocess.STDOUT,
                    )  # fmt: skip
                )

            outputs = [asyncio.ensure_future(a.communicate()) for a in attackers]
            statuses: list[int] = []
            while not all(o.done() for o in outputs):
                async with s.get(f"http://127.0.0.1:{port}/normal") as r:
                    assert await r.text() == "hello"
                    statuses.append(r.status)
                await asyncio.sleep(0.05)
            reports = [(await o)[0] for o in outputs]
            assert [a.returncode for a in attackers] == [0, 0, 0], reports
            for raw in reports[:2]:
                report = re.sub(r"\x1b\[[0-9;]*m", "", raw.decode(errors="replace"))
                # slowhttptest's own probe found the service available at every tick
                assert "service available:   YES" in report, report[-2000:]
                assert "service available:   NO" not in report, report[-2000:]
                # every slow connection was closed by the sidecar before the 6 s test length
                assert "Exit status: No open connections left" in report, report[-2000:]
            assert len(statuses) >= 10 and set(statuses) == {200}

            text = await scrape(s, sc.ports["admin"])
            cut_head = metric(text, "gts_sidecar_client_errors_total", reason="header_timeout")
            cut_body = metric(text, "gts_sidecar_client_errors_total", reason="body_timeout")
            cut_read = metric(text, "gts_sidecar_client_errors_total", reason="slow_read")
            # 150 slow connections of each kind (and re-opened ones): most were cut
            assert cut_head >= 100, text
            assert cut_body >= 100, text
            # the slow readers were cut by the minimum rate, each freeing its app connection
            assert cut_read >= SLOW_READERS / 2, text
            # and none of it was blamed on the app
            assert (
                metric(text, "gts_sidecar_upstream_timeouts_total", upstream="app", kind="total")
                == 0
            ), text
            assert sc.proc.returncode is None
            report = re.sub(r"\x1b\[[0-9;]*m", "", reports[2].decode(errors="replace"))
            assert "service available:   NO" not in report, report[-2000:]
            peak = hwm_kib(sc.proc.pid)
            assert peak - baseline < SLOW_READ_BOUND_KIB, (peak, baseline)
    finally:
        for a in attackers:
            if a.returncode is None:
                a.kill()
                await a.wait()
        await sc.stop()
