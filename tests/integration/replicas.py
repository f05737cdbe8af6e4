"""Three `gts-sidecar coordinator` processes on one real PostgreSQL, and what the replica
tests drive them with: a signing GTS REST v1 client per replica and a participant that
counts each branch's phase-two calls (tests/pg_server.py starts the database)."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from sidecar.coordinator.signing import KeyRing
from tests.component.gts import SignedClient
from tests.faults.procs import SECRET, Coordinator
from tests.pg_server import PgCluster

FAST_PHASE_TWO = {"initial": "50ms", "max": "300ms", "max_attempts": 100000}
FINAL = {"Committed", "Rollbacked", "TimeoutRollbacked"}


def replica_config(pg: PgCluster, db: str, lease: str) -> dict[str, Any]:
    return {
        "journal": pg.url(db),
        "password_file": str(pg.password_file),
        "lease": lease,
        "statement_timeout": "1s",
        "pool_size": 4,
        "phase_two": FAST_PHASE_TWO,
    }


@dataclass
class Participant:
    """Plays the branches' sidecars: answers phase two with 503 (retry later) while `failing`
    is set, else applies it. `applied` counts the calls answered as done, per branch and
    direction; `seen` records (time, branch, phase) of every call."""

    failing: bool = True
    applied: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    seen: list[tuple[float, str, str]] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    def url(self, resource: str) -> str:
        return f"http://127.0.0.1:{self.port}/branches/{resource}"

    async def start(self) -> Participant:
        app = web.Application()
        app.router.add_post("/branches/{resource}/{phase}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        branch, phase = str(body["branchId"]), request.match_info["phase"]
        self.seen.append((time.monotonic(), branch, phase))
        if self.failing:
            return web.Response(status=503, text="try later")
        self.applied[(branch, phase)] += 1
        status = "PhaseTwo_Committed" if phase == "commit" else "PhaseTwo_Rollbacked"
        return web.json_response({"status": status})


class Replicas:
    """The three coordinator processes and a signed client for each."""

    def __init__(self, tmp: Path, pg: PgCluster, db: str, *, lease: str = "2s") -> None:
        self.coordinators = [
            Coordinator(tmp / f"r{i}", **replica_config(pg, db, lease)) for i in range(3)
        ]
        self.keys = KeyRing(("k1", SECRET.encode()))
        self.session: aiohttp.ClientSession | None = None
        self.clients: list[SignedClient] = []

    async def start(self) -> Replicas:
        for c in self.coordinators:
            await c.start()
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        self.clients = [
            SignedClient(self.session, c.ports["peer"], self.keys) for c in self.coordinators
        ]
        return self

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        for c in self.coordinators:
            await c.stop()

    def owner_of(self, xid: str) -> int:
        """Which replica issued the XID (its host:port names the replica's peer port)."""
        port = int(xid.rsplit(":", 2)[1])
        return next(i for i, c in enumerate(self.coordinators) if c.ports["peer"] == port)

    def logged(self, i: int, msg: str) -> bool:
        sp = self.coordinators[i].sp
        return sp is not None and any(rec.get("msg") == msg for rec in sp.log)

    async def status(self, xid: str, via: int) -> tuple[str, list[dict[str, Any]]] | None:
        reply = await self.clients[via].call(
            "GET", f"/api/v1/transaction/{xid.replace(':', '%3A')}"
        )
        if reply.status != 200:
            return None
        body = reply.json()
        return str(body["status"]), list(body.get("branches", []))

    async def ready(self, i: int) -> bool:
        assert self.session is not None
        url = f"http://127.0.0.1:{self.coordinators[i].ports['admin']}/readyz"
        try:
            async with self.session.get(url) as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False
