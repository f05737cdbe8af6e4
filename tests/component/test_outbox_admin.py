"""The outbox through a running sidecar: a decision the cluster cannot take is kept (503
Unknown), the cluster's refusal of the re-sent decision leaves a stuck item on
/admin/outbox that an operator retries or skips, past local_coordinator.outbox_max_items a
decision is answered 503 OUTBOX_FULL, and gts_sidecar_outbox_depth follows."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import quote

import aiohttp
from aiohttp import web


async def _until(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not await predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


async def test_refused_decisions_are_stuck_items_an_operator_settles(
    sidecar_factory, aiohttp_server, tmp_path: Path
) -> None:
    mode = {"now": "down"}
    commits: list[str] = []

    async def decide(request: web.Request) -> web.Response:
        xid = request.match_info["xid"]
        commits.append(xid)
        if mode["now"] == "down":
            body = {"error": {"code": "COORDINATOR_UNAVAILABLE", "message": "restarting"}}
            return web.json_response(body, status=503)
        if mode["now"] == "refuse":
            body = {"error": {"code": "TRANSACTION_NOT_FOUND", "message": f"no {xid}"}}
            return web.json_response(body, status=404)
        return web.json_response({"xid": xid, "status": "Committed"})

    app = web.Application()
    app.router.add_post("/api/v1/transaction/{xid}/commit", decide)
    cluster = await aiohttp_server(app)
    token = tmp_path / "token"
    token.write_text("admin-secret\n")
    sc = await sidecar_factory(
        {
            "admin": {"token_file": str(token)},
            "coordinator": {
                "endpoints": [f"http://127.0.0.1:{cluster.port}"],
                "breaker": {"failures": 1000},
            },
            "local_coordinator": {
                "journal": f"sqlite:///{tmp_path}/journal.db",
                "outbox_max_items": 2,
            },
        }
    )
    owned = [f"127.0.0.1:{cluster.port}:{n}" for n in (11, 12, 13)]
    api = f"http://127.0.0.1:{sc.ports['api']}/v1/transactions"
    admin = f"http://127.0.0.1:{sc.ports['admin']}/admin/outbox"
    auth = {"Authorization": "Bearer admin-secret"}

    def depth() -> float | None:
        return sc.metrics.registry.get_sample_value("gts_sidecar_outbox_depth")

    async with aiohttp.ClientSession() as s:

        async def commit(xid: str) -> tuple[int, dict[str, str], dict]:
            async with s.post(f"{api}/{quote(xid, safe='')}/commit") as r:
                return r.status, dict(r.headers), await r.json()

        async def listing(state: str | None = None) -> dict:
            params = {"state": state} if state else {}
            async with s.get(admin, params=params, headers=auth) as r:
                assert r.status == 200, await r.text()
                return await r.json()

        # the cluster cannot take two decisions: both kept, the app told Unknown
        for xid in owned[:2]:
            status, headers, _ = await commit(xid)
            assert status == 503
            assert headers["x-gts-transaction-status"] == "Unknown"
        assert depth() == 2

        # a third one, the outbox at its cap: refused, not kept
        status, headers, body = await commit(owned[2])
        assert (status, body["error"]["code"]) == (503, "OUTBOX_FULL")
        assert headers["x-gts-sidecar-error"] == "OUTBOX_FULL"
        assert "outbox_max_items" in body["error"]["message"]
        assert depth() == 2

        # the cluster refuses the re-sent decisions: kept as stuck, listed for an operator
        mode["now"] = "refuse"

        async def both_stuck() -> bool:
            return len((await listing("stuck"))["items"]) == 2

        await _until(both_stuck)
        listed = await listing()
        assert listed["depth"] == 2 and listed["maxItems"] == 2
        first = next(i for i in listed["items"] if i["xid"] == owned[0])
        assert first["decision"] == "commit" and "TRANSACTION_NOT_FOUND" in first["lastError"]
        async with s.get(admin) as r:
            assert r.status == 401  # behind the admin token

        # retry one (the cluster takes it now), skip the other
        mode["now"] = "accept"
        quoted = [quote(x, safe="") for x in owned]
        async with s.post(f"{admin}/{quoted[0]}/retry", headers=auth) as r:
            assert r.status == 200 and (await r.json())["state"] == "pending"
        async with s.post(f"{admin}/{quoted[1]}/skip", headers=auth) as r:
            assert r.status == 200 and (await r.json())["action"] == "skip"
        async with s.post(f"{admin}/{quoted[1]}/skip", headers=auth) as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "OUTBOX_ITEM_NOT_FOUND"
        async with s.get(admin, params={"state": "lost"}, headers=auth) as r:
            assert r.status == 400

        async def empty() -> bool:
            return (await listing())["depth"] == 0

        await _until(empty)
        assert commits.count(owned[0]) >= 3  # asked, refused, then delivered on retry
        assert depth() == 0
