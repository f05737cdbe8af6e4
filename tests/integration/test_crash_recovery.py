"""kill -9 at arbitrary points, restart, and check what the app saw: every acknowledged
transaction reaches a final state, and every branch's phase two takes effect exactly once, in
the direction of its transaction's outcome (the app applies confirm/cancel once per
Idempotency-Key, as documented; the fence keeps the calls to one per phase but for the crash
window between calling the app and recording it)."""

from __future__ import annotations

import asyncio
import random
import signal
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.component.servers import free_port
from tests.integration.proc import start_sidecar, write_config

ROUNDS = 6
WORKERS = 6


class Ledger:
    """The participant app: tries reserve, confirm/cancel apply once per Idempotency-Key."""

    def __init__(self) -> None:
        self.tried: set[tuple[str, str]] = set()
        self.applied: dict[str, dict[tuple[str, str], int]] = defaultdict(dict)
        self.calls: dict[str, int] = defaultdict(int)

    async def handle(self, request: web.Request) -> web.Response:
        xid, branch = request.headers["XID"], request.headers["x-gts-branch-id"]
        if request.path == "/try":
            self.tried.add((xid, branch))
            return web.Response(text="reserved")
        phase = request.path.strip("/")
        self.calls[phase] += 1
        key = request.headers["Idempotency-Key"]
        assert key == f"{xid}:{branch}:{'commit' if phase == 'confirm' else 'rollback'}"
        self.applied[phase].setdefault((xid, branch), 0)
        self.applied[phase][(xid, branch)] += 1
        return web.Response(text="ok")


async def test_sigkill_at_random_points_loses_nothing(tmp_path: Path, aiohttp_server) -> None:
    rng = random.Random(20261125)
    ledger = Ledger()
    app = web.Application()
    app.router.add_post("/{tail:.*}", ledger.handle)
    server = await aiohttp_server(app)
    ports = {name: free_port() for name in ("inbound", "outbound", "api", "peer", "admin")}
    cfg = write_config(
        tmp_path / "sidecar.yaml",
        {
            "listeners": {n: {"bind": f"127.0.0.1:{p}"} for n, p in ports.items()},
            "app": {
                "url": f"http://127.0.0.1:{server.port}",
                "timeouts": {"response_header": "1s", "total": "1500ms"},
            },
            "coordinator": {"timeouts": {"request": "1s"}},
            "local_coordinator": {
                "journal": f"sqlite:///{tmp_path.resolve()}/journal.db",
                "default_timeout": "2s",
                "phase_two": {"initial": "50ms", "max": "200ms", "max_attempts": 1000},
            },
            "tcc": [
                {
                    "resource": "acct",
                    "try": {"method": "POST", "path": "/try"},
                    "confirm": {"method": "POST", "path": "/confirm"},
                    "cancel": {"method": "POST", "path": "/cancel"},
                }
            ],
        },
    )
    api = f"http://127.0.0.1:{ports['api']}/v1/transactions"
    acknowledged: set[str] = set()

    async def worker(s: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with s.post(api, json={"name": "pay"}) as r:
                    if r.status != 200:
                        continue
                    xid = (await r.json())["xid"]
                acknowledged.add(xid)
                async with s.post(
                    f"http://127.0.0.1:{ports['inbound']}/try", headers={"XID": xid}, data=b"{}"
                ) as r:
                    await r.read()
                verb = "commit" if rng.random() < 0.6 else "rollback"
                async with s.post(f"{api}/{xid}/{verb}") as r:
                    await r.read()
            except (aiohttp.ClientError, OSError):
                await asyncio.sleep(0.01)  # the sidecar is down: try again (bounded by stop)

    kills = 0
    for _ in range(ROUNDS):
        sc = await start_sidecar(cfg)
        stop = asyncio.Event()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            tasks = [asyncio.ensure_future(worker(s, stop)) for _ in range(WORKERS)]
            await asyncio.sleep(rng.uniform(0.1, 0.6))  # the crash point: anywhere in flight
            sc.signal(signal.SIGKILL)
            kills += 1
            await sc.wait(30)
            stop.set()
            await asyncio.gather(*tasks)
        await sc.stop()

    # a last start: everything unfinished resumes (phase two, or its timeout)
    sc = await start_sidecar(cfg)
    try:
        async with aiohttp.ClientSession() as s:

            async def outcomes() -> dict[str, dict[str, Any]]:
                while True:
                    out = {}
                    for xid in acknowledged:
                        async with s.get(f"{api}/{xid}") as r:
                            out[xid] = await r.json()
                    if all(
                        o["status"] in ("Committed", "Rollbacked", "TimeoutRollbacked")
                        for o in out.values()
                    ):
                        return out
                    await asyncio.sleep(0.1)

            final = await asyncio.wait_for(outcomes(), 60)
    finally:
        await sc.stop()

    assert kills == ROUNDS and len(acknowledged) > ROUNDS
    confirmed, cancelled = ledger.applied["confirm"], ledger.applied["cancel"]
    for xid, status in final.items():
        for branch in status["branches"]:
            key = (xid, str(branch["branchId"]))
            if status["status"] == "Committed":
                assert key in confirmed and key not in cancelled, (key, status)
            else:
                assert key not in confirmed, (key, status)
                # cancelled at the app, or never tried there (an empty rollback)
                assert key in cancelled or key not in ledger.tried, (key, status)
