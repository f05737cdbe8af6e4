"""An idle-connection flood: 20,000 connections to the inbound listener that send nothing, with
the sidecar at a 20,000 file-descriptor limit. Uncapped, they took every descriptor, and then
inbound, `/healthz` and the TM API all refused connections. Capped (clients.max_connections,
10,000 by default), the flood gets 503 CONNECTION_LIMIT past the cap and the admin and api
listeners keep answering."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.faults.procs import start_sidecar, write_config
from tests.faults.test_storm import raise_nofile
from tests.faults.util import metric, scrape, wait_until

FLOOD = 20_000
FLOODERS = 2  # each holds FLOOD / FLOODERS sockets: one process's limit is 20,000 here
FD_LIMIT = 20_000

#: a process that opens N connections that send nothing, says "ready", and holds them until
#: its stdin closes
FLOODER = """
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
held = []
for _ in range(n):
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect(("127.0.0.1", port))
    except BlockingIOError:
        pass
    held.append(s)
print("ready", flush=True)
sys.stdin.read()
"""


async def test_an_idle_flood_leaves_health_checks_and_the_tm_api_answering(
    tmp_path: Path,
) -> None:
    cfg: dict[str, Any] = {
        "listeners": {
            # long enough that the flood is held by the cap, not closed by the idle timer
            "inbound": {"bind": "127.0.0.1:0", "timeouts": {"header_read": "120s"}},
            **{n: {"bind": "127.0.0.1:0"} for n in ("outbound", "api", "peer", "admin")},
        },
    }
    sc = await start_sidecar(write_config(tmp_path / "sidecar.yaml", cfg))
    flooders: list[asyncio.subprocess.Process] = []
    try:
        raise_nofile(sc.proc.pid, FD_LIMIT)
        port = sc.ports["inbound"]
        for _ in range(FLOODERS):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", FLOODER, str(port), str(FLOOD // FLOODERS),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            flooders.append(proc)
            assert proc.stdout is not None
            assert (await asyncio.wait_for(proc.stdout.readline(), 120)).strip() == b"ready"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            admin = sc.ports["admin"]
            texts: list[str] = []

            async def refused_enough() -> bool:
                texts.append(await scrape(s, admin))
                return (
                    metric(texts[-1], "gts_sidecar_client_errors_total", reason="connection_limit")
                    >= FLOOD - 10_000 - 100
                )

            await wait_until(
                refused_enough, timeout=120, interval=0.2, what=lambda: texts[-1][-3000:]
            )
            held = metric(texts[-1], "gts_sidecar_downstream_connections", listener="inbound")
            assert held <= 10_000
            # the admin and api listeners still accept and answer
            async with s.get(f"http://127.0.0.1:{admin}/healthz") as r:
                assert r.status == 200
            api = f"http://127.0.0.1:{sc.ports['api']}/v1/transactions"
            async with s.post(api, json={"name": "during-flood", "timeout": "30s"}) as r:
                assert r.status in (200, 201), await r.text()
                assert (await r.json())["status"] == "Begin"
        for proc in flooders:
            assert proc.stdin is not None
            proc.stdin.close()
            await proc.wait()
        # once the flood is gone, inbound serves again (no app behind it: 502, not refused)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            statuses: list[int] = []

            async def served() -> bool:
                async with s.get(f"http://127.0.0.1:{port}/after") as r:
                    statuses.append(r.status)
                return r.status != 503

            await wait_until(served, timeout=10, interval=0.1, what=lambda: statuses)
            assert statuses[-1] == 502, statuses
        assert sc.proc.returncode is None
    finally:
        for proc in flooders:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await sc.stop()
