"""The participant's fence over a real SQLite file and a real app on loopback: a confirm and
a cancel racing for one branch call the app once; repeats and empty rollbacks never do."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from sidecar import config as configmod
from sidecar.txn.branches import BranchRules, BranchSuspended, Participant
from sidecar.txn.fence_store import SqliteFenceStore
from sidecar.txn.tries import TryEnd

XID = "10.0.0.5:17020:42"


def _body(branch_id: int) -> bytes:
    return orjson.dumps(
        {
            "xid": XID,
            "branchId": branch_id,
            "resourceId": "inv",
            "applicationData": {
                "body": base64.b64encode(b"payload").decode(),
                "headers": {"X-Tenant": "t1"},
                "query": "a=1",
            },
        }
    )


@pytest.fixture
async def app_calls(aiohttp_server):
    calls: list[tuple[str, str, bytes]] = []
    gate = asyncio.Event()
    gate.set()

    async def handler(request: web.Request) -> web.Response:
        calls.append((request.path, request.query_string, await request.read()))
        await gate.wait()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    server = await aiohttp_server(app)
    return calls, gate, f"http://127.0.0.1:{server.port}"


@pytest.fixture
async def participant(app_calls, tmp_path: Path):
    _, _, url = app_calls
    cfg = configmod.parse(
        {
            "tcc": [
                {
                    "resource": "inv",
                    "try": {"method": "POST", "path": "/try"},
                    "confirm": {"method": "POST", "path": "/confirm"},
                    "cancel": {"method": "POST", "path": "/cancel"},
                }
            ]
        },
        env={},
    )
    fence = SqliteFenceStore(str(tmp_path / "fence.db"))
    await fence.open()
    p = Participant(BranchRules(cfg), fence, url, timeout=5, connect_timeout=1)
    yield p
    await p.close()
    await fence.close()


async def test_confirm_and_cancel_racing_call_the_app_once(participant, app_calls) -> None:
    calls, gate, _ = app_calls
    await participant.begin_try(XID, 1, "inv")
    participant.end_try(XID, 1, TryEnd.ANSWERED)
    gate.clear()  # the first call to reach the app waits there, holding the branch
    confirm = asyncio.ensure_future(participant.phase_two("inv", True, _body(1)))
    cancel = asyncio.ensure_future(participant.phase_two("inv", False, _body(1)))

    async def one_call() -> None:
        while not calls:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(one_call(), 10)
    gate.set()
    answers = await asyncio.gather(confirm, cancel)
    assert len(calls) == 1
    path, query, body = calls[0]
    assert (query, body) == ("a=1", b"payload")  # the try's query and body, replayed
    # the winner is done; the loser is told to retry (and will be refused again)
    assert answers[0]["status"] == "PhaseTwo_Committed"
    assert answers[1]["status"] == "PhaseTwo_RollbackFailed_Retryable"
    assert "cancel after confirm" in answers[1]["reason"]


async def test_repeats_and_empty_rollback_never_reach_the_app(participant, app_calls) -> None:
    calls, _, _ = app_calls
    await participant.begin_try(XID, 2, "inv")
    participant.end_try(XID, 2, TryEnd.ANSWERED)
    for _ in range(3):
        assert (await participant.phase_two("inv", False, _body(2)))["status"] == (
            "PhaseTwo_Rollbacked"
        )
    assert [c[0] for c in calls] == ["/cancel"]
    # a cancel for a branch whose try never came: recorded, acknowledged, app not called
    assert (await participant.phase_two("inv", False, _body(3)))["status"] == (
        "PhaseTwo_Rollbacked"
    )
    assert len(calls) == 1
    # and that try, arriving late, is refused (suspension) — the fence survives a reopen
    fence = participant.fence
    await fence.close()
    await fence.open()
    with pytest.raises(BranchSuspended):
        await participant.begin_try(XID, 3, "inv")


async def test_unknown_resource_and_bad_bodies_are_clear_errors(participant) -> None:
    from sidecar.errors import InvalidRequest
    from sidecar.txn.branches import ResourceNotFound

    with pytest.raises(ResourceNotFound):
        await participant.phase_two("nope", True, _body(1))
    for bad in (b"", b"[]", b'{"xid": 1, "branchId": 1}', b'{"xid": "x", "branchId": true}'):
        with pytest.raises(InvalidRequest):
            await participant.phase_two("inv", True, bad)
