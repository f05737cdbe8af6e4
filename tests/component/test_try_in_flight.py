"""Phase two never overtakes phase one, on real sockets: a participant sidecar whose app's try
is still running when its transaction times out does not pass the cancel to the app until
the try ended (the coordinator is told to retry meanwhile), and then does."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from sidecar import config as configmod
from sidecar.coordinator.states import GlobalStatus
from sidecar.txn.branches import BranchRules, Participant
from sidecar.txn.fence import FenceState
from sidecar.txn.fence_store import SqliteFenceStore
from sidecar.txn.tries import TryEnd
from tests.component.servers import closed_port
from tests.faults.util import wait_until

TRY_TOTAL = 3.0  # the app's total timeout: a try's deadline is its start plus this


class App:
    """The participant app: its try blocks on `gate`; every call is logged in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float]] = []
        self.gate = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    async def _try(self) -> None:
        self.events.append(("try-start", time.time()))
        await self.gate.wait()
        self.events.append(("try-end", time.time()))

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        if request.path == "/try":
            # the try's work goes on even if the request is cancelled (its client left), as
            # in an app that does not stop its work when its request's context ends
            work = asyncio.get_running_loop().create_task(self._try(), name="app-try")
            self.tasks.add(work)
            await asyncio.shield(work)
        else:
            self.events.append((request.path.strip("/"), time.time()))
        return web.json_response({"ok": True})


async def _stack(
    sidecar_factory: Any, aiohttp_server: Any, total: float = TRY_TOTAL
) -> tuple[App, Any]:
    app = App()
    web_app = web.Application()
    web_app.router.add_post("/{tail:.*}", app.handle)
    server = await aiohttp_server(web_app)
    sc = await sidecar_factory(
        {
            "app": {
                "url": f"http://127.0.0.1:{server.port}",
                "timeouts": {
                    "connect": "500ms",
                    "response_header": f"{total - 1:g}s",
                    "total": f"{total:g}s",
                },
            },
            # the callback timeout; a phase two waits at most half of it for a try
            "coordinator": {"timeouts": {"request": "400ms"}},
            "local_coordinator": {"phase_two": {"initial": "50ms", "max": "100ms"}},
            "tcc": [
                {
                    "resource": "inv",
                    "try": {"method": "POST", "path": "/try"},
                    "confirm": {"method": "POST", "path": "/confirm"},
                    "cancel": {"method": "POST", "path": "/cancel"},
                }
            ],
        }
    )
    return app, sc


async def _attempts(engine: Any, xid: str) -> int:
    _, branches = await engine.get(xid)
    return branches[0].attempts if branches else 0


async def test_cancel_waits_for_a_try_that_outlasts_its_transaction(
    sidecar_factory, aiohttp_server
) -> None:
    # the call to the app is cut when the transaction runs out of time (no call outlives its
    # transaction); the app may still be running the try, so it counts as running until its
    # recorded deadline (its start + the app's total timeout)
    app, sc = await _stack(sidecar_factory, aiohttp_server, total=3.0)
    engine = sc.control.engine
    tx = await engine.begin("slow-try", 1500)  # times out while the try runs
    url = f"http://127.0.0.1:{sc.ports['inbound']}/try"
    async with aiohttp.ClientSession() as s:
        call = asyncio.ensure_future(s.post(url, headers={"XID": tx.xid}, data=b"{}"))
        await wait_until(lambda: app.names() == ["try-start"])
        # the transaction times out and the coordinator sends the cancel, again and again:
        # each time it is told to retry, and the app sees nothing
        await wait_until(lambda: _two_or_more(engine, tx.xid), what="the coordinator did not retry")
        record, branches = await engine.get(tx.xid)
        assert not record.status.finished  # still waiting for the branch
        assert "Retryable" in (branches[0].last_error or "")
        assert app.names() == ["try-start"]
        # the caller was answered when the transaction's time ran out
        async with await call as r:
            assert r.status == 504
            assert "ran out of time" in (await r.json())["error"]["message"]
        # the try ends at the app: the cancel follows it (after the try's deadline), once
        app.gate.set()
        await wait_until(lambda: "cancel" in app.names(), timeout=10, what=app.names)
    assert app.names() == ["try-start", "try-end", "cancel"]
    await wait_until(
        lambda: _status(engine, tx.xid, GlobalStatus.TIMEOUT_ROLLBACKED, GlobalStatus.ROLLBACKED)
    )


async def _two_or_more(engine: Any, xid: str) -> bool:
    return await _attempts(engine, xid) >= 2


async def _status(engine: Any, xid: str, *want: GlobalStatus) -> bool:
    record, _ = await engine.get(xid)
    return record.status in want


async def test_a_try_whose_client_left_counts_as_running_until_its_deadline(
    sidecar_factory, aiohttp_server
) -> None:
    app, sc = await _stack(sidecar_factory, aiohttp_server)
    engine = sc.control.engine
    tx = await engine.begin("client-left", 60_000)
    sent_at = time.time()
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.ports["inbound"])
    writer.write(
        b"POST /try HTTP/1.1\r\nHost: inv\r\nXID: %s\r\nContent-Length: 2\r\n\r\n{}"
        % tx.xid.encode()
    )
    await wait_until(lambda: app.names() == ["try-start"])
    # the client gives up: the sidecar aborts the request at the app, but the app's handler
    # goes on (as a handler that ignores its request's cancellation does)
    writer.close()
    await writer.wait_closed()
    await engine.rollback(tx.xid)
    await wait_until(lambda: _two_or_more(engine, tx.xid), what="the coordinator did not retry")
    assert app.names() == ["try-start"]
    # the try ends at the app; the sidecar cannot know (no answer comes back), so the try
    # counts as running until its deadline, and only then is the cancel passed on
    app.gate.set()
    await wait_until(lambda: "cancel" in app.names(), timeout=TRY_TOTAL + 10, what=app.names)
    assert app.names() == ["try-start", "try-end", "cancel"]
    assert app.events[-1][1] >= sent_at + TRY_TOTAL


def _body(xid: str, branch_id: int) -> bytes:
    return orjson.dumps(
        {
            "xid": xid,
            "branchId": str(branch_id),
            "resourceId": "inv",
            "applicationData": {"body": "", "headers": {}, "query": ""},
        }
    )


async def test_a_try_in_flight_across_a_restart_holds_phase_two_until_its_deadline(
    aiohttp_server, tmp_path: Path
) -> None:
    app = App()
    web_app = web.Application()
    web_app.router.add_post("/{tail:.*}", app.handle)
    server = await aiohttp_server(web_app)
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
    xid = "127.0.0.1:17020:77"
    path = str(tmp_path / "journal.db.fence")
    url = f"http://127.0.0.1:{server.port}"

    # the first process records the try as running and forwards it, then dies
    fence = SqliteFenceStore(path)
    await fence.open()
    first = Participant(BranchRules(cfg), fence, url, timeout=5, connect_timeout=1)
    await first.begin_try(xid, 9, "inv", timeout=1.5)
    await first.close()
    await fence.close()

    # the next one finds the try recorded in flight: within its deadline the coordinator is
    # told to retry; past it, the try counts as ended (unknown outcome) and is cancelled
    fence = SqliteFenceStore(path)
    await fence.open()
    second = Participant(
        BranchRules(cfg), fence, url, timeout=5, connect_timeout=1, wait_patience=0.1
    )
    try:
        row = await fence.get(xid, 9)
        assert row is not None and row.state is FenceState.TRYING
        answer = await second.phase_two("inv", False, _body(xid, 9))
        assert answer["status"] == "PhaseTwo_RollbackFailed_Retryable"
        assert "still running" in answer["reason"]
        assert app.events == []

        async def rolled_back() -> bool:
            answer = await second.phase_two("inv", False, _body(xid, 9))
            return answer["status"] == "PhaseTwo_Rollbacked"

        await wait_until(rolled_back, timeout=10)
        assert app.names() == ["cancel"]
        assert app.events[0][1] * 1000 >= row.try_deadline_ms
        after = await fence.get(xid, 9)
        assert after is not None and after.state is FenceState.CANCELLED
    finally:
        await second.close()
        await fence.close()


async def test_a_try_that_never_reached_the_app_is_not_cancelled_there(sidecar_factory) -> None:
    """The app is down: the try is refused (502) without reaching it, so its rollback has
    nothing to undo at the app: recorded as an empty rollback, acknowledged at once (were the
    cancel sent, the unreachable app would keep the branch retrying)."""
    sc = await sidecar_factory(
        {
            "app": {"url": f"http://127.0.0.1:{closed_port()}"},
            "tcc": [
                {
                    "resource": "inv",
                    "try": {"method": "POST", "path": "/try"},
                    "confirm": {"method": "POST", "path": "/confirm"},
                    "cancel": {"method": "POST", "path": "/cancel"},
                }
            ],
        }
    )
    engine, fence = sc.control.engine, sc.control.fence
    tx = await engine.begin("app-down", 60_000)
    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{sc.ports['inbound']}/try"
        async with s.post(url, headers={"XID": tx.xid}, data=b"{}") as r:
            assert r.headers["x-gts-sidecar-error"] == "UPSTREAM_UNAVAILABLE"
    _, (branch,) = await engine.get(tx.xid)

    async def undelivered() -> bool:
        row = await fence.get(tx.xid, branch.branch_id)
        return row is not None and row.state is FenceState.UNDELIVERED

    await wait_until(undelivered)
    record = await engine.rollback(tx.xid, wait=5)
    assert record.status is GlobalStatus.ROLLBACKED
    row = await fence.get(tx.xid, branch.branch_id)
    assert row is not None and row.state is FenceState.EMPTY_CANCELLED


async def test_the_end_of_a_try_never_overwrites_a_newer_try_of_the_branch(
    tmp_path: Path,
) -> None:
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
    xid = "127.0.0.1:17020:78"
    fence = SqliteFenceStore(str(tmp_path / "f.fence"))
    await fence.open()
    p = Participant(BranchRules(cfg), fence, "http://127.0.0.1:1", timeout=5, connect_timeout=1)
    try:
        await p.begin_try(xid, 5, "inv")
        p.end_try(xid, 5, TryEnd.ANSWERED)  # its end is recorded in the background...
        await p.begin_try(xid, 5, "inv")  # ...while the branch's try is repeated
        await asyncio.gather(*p._background)
        row = await fence.get(xid, 5)
        assert row is not None and row.state is FenceState.TRYING
        p.end_try(xid, 5, TryEnd.ANSWERED)
        await asyncio.gather(*p._background)
        row = await fence.get(xid, 5)
        assert row is not None and row.state is FenceState.TRIED
    finally:
        await p.close()
        await fence.close()
