"""Two sidecars, two small apps and a standalone coordinator on loopback: a declarative
global transaction at the order service calls a TCC participant (inventory) through the
outbound listener; commit → confirm once, failure → cancel once, all through the fence."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from sidecar.coordinator.signing import KeyRing, sign_headers
from sidecar.txn.branches import BranchSuspended
from tests.integration.test_coordinator_e2e import CoordinatorProcess, remote


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "signing.key"
    path.write_text("tcc-e2e-signing-secret-0123456789\n")
    return path


class Inventory:
    """The participant app: records every call by path."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append((request.path, dict(request.headers), await request.read()))
        if request.path == "/deduct" and request.query.get("fail"):
            return web.json_response({"ok": False}, status=409)
        return web.json_response({"ok": True})

    def count(self) -> Counter[str]:
        return Counter(path for path, _, _ in self.calls)


async def wait_for(predicate, timeout: float = 20.0) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


@pytest.fixture
async def stack(tmp_path: Path, key_file: Path, sidecar_factory, aiohttp_server):
    coordinator = CoordinatorProcess(
        tmp_path, key_file, phase_two={"initial": "50ms", "max": "200ms"}
    )
    await coordinator.start()
    signing = {"key_id": "k1", "secret_file": str(key_file)}
    inventory = Inventory()
    inv_app = web.Application()
    inv_app.router.add_route("*", "/{tail:.*}", inventory.handle)
    inv_server = await aiohttp_server(inv_app)
    participant = await sidecar_factory(
        {
            "app": {"url": f"http://127.0.0.1:{inv_server.port}"},
            "coordinator": {"endpoints": [coordinator.url], "signing": signing},
            "local_coordinator": {"journal": f"sqlite:///{tmp_path.resolve()}/participant.db"},
            "tcc": [
                {
                    "resource": "inventory-deduct",
                    "try": {"method": "POST", "path": "/deduct"},
                    "confirm": {"method": "POST", "path": "/deduct/confirm"},
                    "cancel": {"method": "POST", "path": "/deduct/cancel"},
                    "forward_headers": ["Content-Type", "X-Tenant"],
                }
            ],
        }
    )
    holder: dict[str, Any] = {}

    async def orders(request: web.Request) -> web.Response:
        xid = request.headers["XID"]
        fail = request.query.get("fail", "")
        url = f"http://127.0.0.1:{holder['initiator'].ports['outbound']}/inventory/deduct"
        if fail == "try":
            url += "?fail=1"
        async with aiohttp.ClientSession() as s:
            async with s.post(
                url, data=b'{"sku":"A1","qty":2}',
                headers={"XID": xid, "Content-Type": "application/json", "X-Tenant": "t1",
                         "Authorization": "Bearer caller-token"},
            ) as r:  # fmt: skip
                ok = r.status == 200
        if not ok or fail == "after":
            return web.json_response({"order": None}, status=500)
        return web.json_response({"order": 1}, status=201)

    order_app = web.Application()
    order_app.router.add_post("/orders", orders)
    order_server = await aiohttp_server(order_app)
    initiator = await sidecar_factory(
        {
            "app": {"url": f"http://127.0.0.1:{order_server.port}"},
            "coordinator": {"endpoints": [coordinator.url], "signing": signing},
            "upstreams": {"inventory": {"url": f"http://127.0.0.1:{participant.ports['inbound']}"}},
            "transactions": [
                {"match": {"method": "POST", "path": "/orders"}, "name": "order", "timeout": "30s"}
            ],
        }
    )
    holder["initiator"] = initiator
    yield coordinator, initiator, participant, inventory
    await coordinator.kill(15)


async def place(initiator, query: str = "") -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{initiator.ports['inbound']}/orders{query}") as r:
            await r.read()
            return r


async def test_commit_confirms_once_with_the_try_body_and_stable_idempotency_key(stack) -> None:
    coordinator, initiator, participant, inventory = stack
    r = await place(initiator)
    assert r.status == 201
    assert r.headers["x-gts-transaction-status"] == "Committed"
    xid = r.headers["XID"]
    await wait_for(lambda: inventory.count()["/deduct/confirm"] == 1)
    assert inventory.count() == Counter({"/deduct": 1, "/deduct/confirm": 1})
    (_, try_headers, try_body), (_, headers, body) = inventory.calls
    branch_id = try_headers["x-gts-branch-id"]
    assert try_headers["XID"] == xid
    assert body == try_body == b'{"sku":"A1","qty":2}'
    assert headers["XID"] == xid
    assert headers["x-gts-branch-id"] == branch_id
    assert headers["x-gts-phase"] == "confirm"
    assert headers["Idempotency-Key"] == f"{xid}:{branch_id}:commit"
    assert headers["X-Tenant"] == "t1"  # in forward_headers
    assert "Authorization" not in headers  # never replayed from the try

    # a repeated confirm (the coordinator retrying after a lost answer) is answered from the
    # fence; the app is not called again
    client = remote(coordinator.url, key_file=Path(coordinator.path).parent / "signing.key")
    status = await client.status(xid)
    await client.close()
    (branch,) = status["branches"]
    assert branch["status"] == "PhaseTwo_Committed"
    answer = await callback(participant, "commit", xid, int(branch_id), Path(coordinator.path))
    assert answer == {"status": "PhaseTwo_Committed"}
    assert inventory.count()["/deduct/confirm"] == 1


async def test_failure_after_the_try_cancels_once(stack) -> None:
    coordinator, initiator, participant, inventory = stack
    r = await place(initiator, "?fail=after")
    assert r.status == 500
    assert r.headers["x-gts-transaction-status"] == "Rollbacked"
    await wait_for(lambda: inventory.count()["/deduct/cancel"] == 1)
    assert inventory.count() == Counter({"/deduct": 1, "/deduct/cancel": 1})
    _, headers, body = inventory.calls[-1]
    assert headers["x-gts-phase"] == "cancel"
    assert body == b'{"sku":"A1","qty":2}'


async def test_a_failed_try_is_reported_and_cancelled(stack) -> None:
    coordinator, initiator, participant, inventory = stack
    r = await place(initiator, "?fail=try")
    assert r.status == 500
    assert r.headers["x-gts-transaction-status"] == "Rollbacked"
    await wait_for(lambda: inventory.count()["/deduct/cancel"] == 1)


async def test_empty_rollback_is_recorded_and_a_later_try_is_refused(stack) -> None:
    coordinator, initiator, participant, inventory = stack
    path = Path(coordinator.path)
    xid = f"127.0.0.1:{coordinator.ports['peer']}:424242"
    # cancel for a branch whose try never arrived: acknowledged, app not called
    answer = await callback(participant, "rollback", xid, 7, path)
    assert answer == {"status": "PhaseTwo_Rollbacked"}
    assert inventory.count()["/deduct/cancel"] == 0
    # ...and its try, arriving late ("suspension"), is refused
    with pytest.raises(BranchSuspended):
        await participant.control.participant.begin_try(xid, 7, "inventory-deduct")


async def test_a_try_without_xid_is_refused(stack) -> None:
    coordinator, initiator, participant, inventory = stack
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{participant.ports['inbound']}/deduct") as r:
            assert r.status == 400
            assert r.headers["x-gts-sidecar-error"] == "XID_REQUIRED"
    assert inventory.calls == []


async def callback(participant, phase: str, xid: str, branch_id: int, coord_cfg: Path) -> Any:
    key = (coord_cfg.parent / "signing.key").read_text().strip().encode()
    ring = KeyRing(("k1", key))
    path = f"/v1/resources/inventory-deduct/{phase}"
    body = orjson.dumps(
        {
            "xid": xid,
            "branchId": branch_id,
            "resourceId": "inventory-deduct",
            "applicationData": {"body": "", "headers": {}, "query": ""},
        }
    )
    headers = sign_headers(
        ring, "POST", path, "", body, now_ms=time.time_ns() // 1_000_000, xid=xid
    )
    headers.update({"XID": xid, "Content-Type": "application/json"})
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"http://127.0.0.1:{participant.ports['peer']}{path}", data=body, headers=headers
        ) as r:
            assert r.status == 200, await r.text()
            return await r.json()
