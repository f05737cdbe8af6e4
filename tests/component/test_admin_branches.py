"""Stuck branches on the admin listener: listed, retried, skipped — behind the admin token."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from aiohttp import web

from sidecar.coordinator.states import BranchType
from tests.component.servers import closed_port


async def _until(predicate, timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not await predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


async def test_stuck_branch_is_listed_then_retried_or_skipped(
    sidecar_factory, aiohttp_server, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("admin-secret\n")
    healthy = asyncio.Event()

    async def confirm(request: web.Request) -> web.Response:
        if healthy.is_set():
            return web.json_response({"status": "PhaseTwo_Committed"})
        return web.json_response({"status": "PhaseTwo_CommitFailed_Retryable"}, status=503)

    app = web.Application()
    app.router.add_post("/cb/commit", confirm)
    branch_server = await aiohttp_server(app)
    sc = await sidecar_factory(
        {
            "admin": {"token_file": str(token)},
            "local_coordinator": {
                "phase_two": {"initial": "10ms", "max": "20ms", "max_attempts": 2}
            },
        }
    )
    engine = sc.control.engine
    auth = {"Authorization": "Bearer admin-secret"}
    admin = f"http://127.0.0.1:{sc.ports['admin']}/admin/branches"

    async def settle(callback: str) -> tuple[str, int]:
        tx = await engine.begin("t", 60_000)
        b = await engine.register(tx.xid, BranchType.TCC, "r", callback, b"{}")
        await engine.commit(tx.xid)
        return tx.xid, b.branch_id

    xid1, b1 = await settle(f"http://127.0.0.1:{branch_server.port}/cb")
    xid2, b2 = await settle(f"http://127.0.0.1:{closed_port()}/cb")
    async with aiohttp.ClientSession() as s:
        async with s.get(admin, params={"state": "stuck"}) as r:
            assert r.status == 401  # the admin token is required

        async def both_stuck() -> bool:
            async with s.get(admin, params={"state": "stuck"}, headers=auth) as r:
                body = await r.json()
            return {b["branchId"] for b in body["branches"]} == {str(b1), str(b2)}

        await _until(both_stuck)
        assert sc.metrics.registry.get_sample_value("gts_sidecar_branches_stuck_total") == 2

        # retry: the participant is healthy again, phase two resumes and finishes
        healthy.set()
        async with s.post(f"{admin}/{b1}/retry", headers=auth) as r:
            assert r.status == 200
        # skip: settled by hand, the app is not called
        async with s.post(f"{admin}/{b2}/skip", headers=auth) as r:
            assert r.status == 200
            assert (await r.json())["lastError"] == "skipped by an operator"

        async def finished() -> bool:
            statuses = [(await engine.get(x))[0].status.value for x in (xid1, xid2)]
            return statuses == ["Committed", "Committed"]

        await _until(finished)
        async with s.post(f"{admin}/{b1}/retry", headers=auth) as r:
            assert r.status == 404  # no longer live
        async with s.post(f"{admin}/nope/skip", headers=auth) as r:
            assert r.status == 400
