"""End to end over real sockets: a sidecar pointed at a standalone coordinator process runs
declarative transactions; the coordinator, SIGKILLed mid-transaction, resumes on restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from sidecar import config as configmod
from sidecar.coordinator.client import RemoteCoordinator
from sidecar.coordinator.signing import KeyRing
from sidecar.coordinator.states import BranchType
from sidecar.metrics import Metrics

LISTENERS = {n: {"bind": "127.0.0.1:0"} for n in ("inbound", "outbound", "api", "peer", "admin")}


class CoordinatorProcess:
    def __init__(self, tmp: Path, key_file: Path, *, peer_port: int = 0, **local: Any) -> None:
        self.path = tmp / "coordinator.yaml"
        data = {
            "listeners": {**LISTENERS, "peer": {"bind": f"127.0.0.1:{peer_port}"}},
            "logging": {"level": "info"},
            "drain_timeout": "2s",
            "coordinator": {"signing": {"key_id": "k1", "secret_file": str(key_file)}},
            "local_coordinator": {"journal": f"sqlite:///{tmp.resolve()}/coordinator.db", **local},
        }
        self.path.write_text(yaml.safe_dump(data))
        self.proc: asyncio.subprocess.Process | None = None
        self.ports: dict[str, int] = {}
        self.resumed = 0

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "coordinator", "--config", str(self.path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        assert self.proc.stderr is not None
        while True:
            line = await asyncio.wait_for(self.proc.stderr.readline(), 30)
            if not line:
                raise AssertionError(f"coordinator exited: {await self.proc.wait()}")
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("msg") == "gts-sidecar coordinator started":
                self.ports = rec["ports"]
                self.resumed = rec["resumed"]
                break
        self._drain = asyncio.ensure_future(self._read_rest())

    async def _read_rest(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while await self.proc.stderr.readline():
            pass

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['peer']}"

    async def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        rc = await asyncio.wait_for(self.proc.wait(), 30)
        await self._drain
        return rc


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "signing.key"
    path.write_text("e2e-test-signing-secret-0123456789\n")
    return path


def remote(url: str, key_file: Path) -> RemoteCoordinator:
    cfg = configmod.parse(
        {
            "coordinator": {
                "endpoints": [url],
                "signing": {"key_id": "k1", "secret_file": str(key_file)},
            }
        },
        env={},
    )
    return RemoteCoordinator(
        cfg.coordinator, KeyRing.from_config(cfg.coordinator.signing), Metrics()
    )


async def test_declarative_transaction_commits_and_rolls_back_through_a_standalone_coordinator(
    tmp_path: Path, key_file: Path, sidecar_factory, aiohttp_server
) -> None:
    coordinator = CoordinatorProcess(tmp_path, key_file)
    await coordinator.start()
    seen: list[str | None] = []

    async def orders(request: web.Request) -> web.Response:
        seen.append(request.headers.get("XID"))
        ok = request.query.get("fail") is None
        return web.json_response({"order": 1}, status=201 if ok else 500)

    app = web.Application()
    app.router.add_post("/orders", orders)
    server = await aiohttp_server(app)
    sc = await sidecar_factory(
        {
            "app": {"url": f"http://127.0.0.1:{server.port}"},
            "coordinator": {
                "endpoints": [coordinator.url],
                "signing": {"key_id": "k1", "secret_file": str(key_file)},
            },
            "transactions": [
                {
                    "match": {"method": "POST", "path": "/orders"},
                    "name": "create-order",
                    "timeout": "30s",
                }
            ],
        }
    )
    client = remote(coordinator.url, key_file)
    try:
        async with aiohttp.ClientSession() as s:
            base = f"http://127.0.0.1:{sc.ports['inbound']}"
            async with s.post(base + "/orders") as r:
                assert r.status == 201
                assert r.headers["x-gts-transaction-status"] == "Committed"
                xid = r.headers["XID"]
            assert seen == [xid]  # the app received the new XID
            assert xid.startswith(f"127.0.0.1:{coordinator.ports['peer']}:")  # owned there
            assert (await client.status(xid))["status"] == "Committed"

            async with s.post(base + "/orders?fail=1") as r:
                assert r.status == 500  # the app's own answer passes through
                assert r.headers["x-gts-transaction-status"] == "Rollbacked"
                failed = r.headers["XID"]
            assert (await client.status(failed))["status"] == "Rollbacked"

            # a request that already carries an XID joins it instead of beginning another
            joined = (await client.begin("outer", 30_000)).xid
            async with s.post(base + "/orders", headers={"XID": joined}) as r:
                assert r.status == 201
                assert "x-gts-transaction-status" not in r.headers
            assert seen[-1] == joined
            assert (await client.status(joined))["status"] == "Begin"
    finally:
        await client.close()
        await coordinator.kill(signal.SIGTERM)


async def test_sigkilled_coordinator_resumes_phase_two_on_restart(
    tmp_path: Path, key_file: Path, aiohttp_server
) -> None:
    coordinator = CoordinatorProcess(
        tmp_path, key_file, phase_two={"initial": "50ms", "max": "200ms", "max_attempts": 1000}
    )
    await coordinator.start()
    calls: list[dict[str, Any]] = []
    healthy = asyncio.Event()
    first_call = asyncio.Event()

    async def confirm(request: web.Request) -> web.Response:
        calls.append(await request.json())
        first_call.set()
        if not healthy.is_set():
            return web.json_response({"status": "PhaseTwo_CommitFailed_Retryable"}, status=503)
        return web.json_response({"status": "PhaseTwo_Committed"})

    branch_app = web.Application()
    branch_app.router.add_post("/cb/commit", confirm)
    branch_server = await aiohttp_server(branch_app)
    client = remote(coordinator.url, key_file)
    try:
        xid = (await client.begin("pay", 60_000)).xid
        branch_id = await client.register(
            xid, BranchType.TCC, "wallet", f"http://127.0.0.1:{branch_server.port}/cb",
            b'{"amount":5}',
        )  # fmt: skip
        state = await client.commit(xid)
        assert state.status in ("Committing", "CommitRetrying")
        await asyncio.wait_for(first_call.wait(), 10)
        assert await coordinator.kill(signal.SIGKILL) == -signal.SIGKILL

        # the same journal, a new process (and a new port: re-point the client)
        await coordinator.start()
        assert coordinator.resumed == 1
        await client.close()
        client = remote(coordinator.url, key_file)
        healthy.set()

        async def committed() -> dict[str, Any]:
            while True:
                status = await client.status(xid)
                if status["status"] == "Committed":
                    return status
                await asyncio.sleep(0.05)

        final = await asyncio.wait_for(committed(), 20)
        (branch,) = final["branches"]
        assert branch["branchId"] == str(branch_id)  # 64-bit ids travel as strings
        assert branch["status"] == "PhaseTwo_Committed"
        assert calls[-1] == {
            "xid": xid, "branchId": str(branch_id), "resourceId": "wallet",
            "applicationData": {"amount": 5},
        }  # fmt: skip
    finally:
        await client.close()
        await coordinator.kill(signal.SIGTERM)
