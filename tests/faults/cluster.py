"""A coordinator process behind a fault proxy, and a sidecar process pointed at the proxy.

The coordinator advertises 127.0.0.2 and binds 127.0.0.1:P; the proxy listens on
127.0.0.2:P. Its XIDs name 127.0.0.2:P, the sidecar's one endpoint, so XID affinity sends
every call about them through the proxy too (never straight to the coordinator)."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.faults.faultproxy import FaultProxy
from tests.faults.procs import Coordinator, signing, start_sidecar, write_config
from tests.integration.proc import SidecarProcess

FAST_PHASE_TWO = {"initial": "50ms", "max": "200ms", "max_attempts": 1000}
TERMINAL = {"Committed", "Rollbacked", "TimeoutRollbacked"}


class Ledger:
    """A TCC participant app: counts tries and each phase-two call per (xid, branch)."""

    def __init__(self) -> None:
        self.tried: set[tuple[str, str]] = set()
        self.calls: dict[tuple[str, str, str], int] = defaultdict(int)

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        xid, branch = request.headers.get("XID", ""), request.headers.get("x-gts-branch-id", "")
        if request.path == "/try":
            self.tried.add((xid, branch))
            return web.Response(text="reserved")
        self.calls[(xid, branch, request.path.strip("/"))] += 1
        return web.Response(text="ok")

    def phases(self, xid: str, branch: str) -> dict[str, int]:
        return {p: n for (x, b, p), n in self.calls.items() if (x, b) == (xid, branch) and n}


TCC = [
    {
        "resource": "acct",
        "try": {"method": "POST", "path": "/try"},
        "confirm": {"method": "POST", "path": "/confirm"},
        "cancel": {"method": "POST", "path": "/cancel"},
    }
]


@dataclass
class Cluster:
    coordinator: Coordinator
    proxy: FaultProxy
    sidecar: SidecarProcess
    ledger: Ledger
    session: aiohttp.ClientSession

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.ports['api']}/v1/transactions"

    @property
    def inbound(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.ports['inbound']}"

    @property
    def cluster_owner(self) -> str:
        return f"127.0.0.2:{self.coordinator.ports['peer']}:"

    @property
    def own_owner(self) -> str:
        return f"127.0.0.1:{self.sidecar.ports['peer']}:"

    async def begin(self, name: str = "t", timeout: str = "30s") -> tuple[int, Any]:
        async with self.session.post(self.api, json={"name": name, "timeout": timeout}) as r:
            return r.status, await r.json(content_type=None)

    async def decide(self, xid: str, commit: bool = True) -> aiohttp.ClientResponse:
        verb = "commit" if commit else "rollback"
        async with self.session.post(f"{self.api}/{xid}/{verb}") as r:
            await r.read()
            return r

    async def status(self, xid: str) -> str | None:
        async with self.session.get(f"{self.api}/{xid}") as r:
            if r.status != 200:
                return None
            return str((await r.json())["status"])

    async def metric(self, name: str) -> float:
        url = f"http://127.0.0.1:{self.sidecar.ports['admin']}/metrics"
        async with self.session.get(url) as r:
            text = await r.text()
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert m, f"{name} not in /metrics"
        return float(m.group(1))


@asynccontextmanager
async def cluster(
    tmp: Path, aiohttp_server: Any, *, sidecar_cfg: dict[str, Any] | None = None
) -> AsyncIterator[Cluster]:
    ledger = Ledger()
    app = web.Application()
    app.router.add_post("/{tail:.*}", ledger.handle)
    server: TestServer = await aiohttp_server(app)
    coordinator = Coordinator(tmp / "coordinator", advertise="127.0.0.2", phase_two=FAST_PHASE_TWO)
    await coordinator.start()
    proxy = FaultProxy("127.0.0.1", coordinator.ports["peer"], host="127.0.0.2",
                       port=coordinator.ports["peer"])  # fmt: skip
    sidecar: SidecarProcess | None = None
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
    try:
        await proxy.start()
        cfg = {
            "app": {"url": f"http://127.0.0.1:{server.port}"},
            "coordinator": {
                "endpoints": [proxy.url],
                "signing": signing(tmp),
                "breaker": {"failures": 1, "reset": "200ms"},
                "timeouts": {"connect": "300ms", "request": "1s"},
            },
            "local_coordinator": {
                "journal": f"sqlite:///{tmp.resolve()}/sidecar.db",
                "phase_two": FAST_PHASE_TWO,
            },
            "tcc": TCC,
            **(sidecar_cfg or {}),
        }
        sidecar = await start_sidecar(write_config(tmp / "sidecar.yaml", cfg))
        yield Cluster(coordinator, proxy, sidecar, ledger, session)
    finally:
        await session.close()
        if sidecar is not None:
            await sidecar.stop()
        await proxy.close()
        await coordinator.stop()
