"""A try in flight across a sidecar restart (real process, SIGKILL): the fence recorded the
try as running with its deadline before it was forwarded, so after the restart a rollback's
cancel is held back (the coordinator is told to retry) until that deadline has passed, and
only then reaches the app, once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.component.servers import free_port
from tests.faults.util import wait_until
from tests.integration.proc import start_sidecar, write_config

#: app.timeouts.total: the try's deadline is its start plus this (long enough for a restart
#: on a loaded machine to come back well before it)
TRY_TOTAL = 10.0


class App:
    """The participant app. Its try keeps working when its request goes away (the sidecar
    that forwarded it is killed), until the test lets it finish."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float]] = []
        self.gate = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    async def _try(self) -> None:
        self.events.append(("try-start", time.time()))
        await self.gate.wait()
        self.events.append(("try-end", time.time()))

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        if request.path == "/try":
            work = asyncio.get_running_loop().create_task(self._try(), name="app-try")
            self.tasks.add(work)
            await asyncio.shield(work)
        else:
            self.events.append((request.path.strip("/"), time.time()))
        return web.json_response({"ok": True})


async def test_a_try_in_flight_across_a_restart_is_not_overtaken(
    tmp_path: Path, aiohttp_server
) -> None:
    app = App()
    web_app = web.Application()
    web_app.router.add_post("/{tail:.*}", app.handle)
    server = await aiohttp_server(web_app)
    # fixed ports: the XID and the branch's callback URL name the peer port, and the
    # restarted sidecar must be found there
    ports = {name: free_port() for name in ("inbound", "outbound", "api", "peer", "admin")}
    cfg = write_config(
        tmp_path / "sidecar.yaml",
        {
            "listeners": {n: {"bind": f"127.0.0.1:{p}"} for n, p in ports.items()},
            "app": {
                "url": f"http://127.0.0.1:{server.port}",
                "timeouts": {
                    "connect": "500ms",
                    "response_header": f"{TRY_TOTAL - 1:g}s",
                    "total": f"{TRY_TOTAL:g}s",
                },
            },
            # a phase two waits at most half the callback timeout for a try in flight
            "coordinator": {"timeouts": {"request": "400ms"}},
            "local_coordinator": {
                "journal": f"sqlite:///{tmp_path.resolve()}/journal.db",
                "phase_two": {"initial": "100ms", "max": "300ms", "max_attempts": 1000},
            },
            "tcc": [
                {
                    "resource": "inv",
                    "try": {"method": "POST", "path": "/try"},
                    "confirm": {"method": "POST", "path": "/confirm"},
                    "cancel": {"method": "POST", "path": "/cancel"},
                }
            ],
        },
    )
    api = f"http://127.0.0.1:{ports['api']}/v1/transactions"
    sidecar = await start_sidecar(cfg)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(api, json={"name": "restart", "timeout": "60s"}) as r:
                assert r.status == 200, await r.text()
                xid = (await r.json())["xid"]
            sent_at = time.time()
            call = asyncio.ensure_future(
                s.post(f"http://127.0.0.1:{ports['inbound']}/try", headers={"XID": xid}, data=b"{}")
            )
            await wait_until(lambda: app.names() == ["try-start"])
            await sidecar.stop()  # SIGKILL with the try in flight at the app
            with contextlib.suppress(aiohttp.ClientError):
                (await call).close()

            sidecar = await start_sidecar(cfg)
            async with s.post(f"{api}/{xid}/rollback") as r:
                assert r.status == 200, await r.text()

            async def attempts() -> int:
                async with s.get(f"{api}/{xid}") as r:
                    body = await r.json()
                return int(body["branches"][0]["attempts"]) if body["branches"] else 0

            async def retried() -> bool:
                return await attempts() >= 2

            # held back: the coordinator is told to retry, and the app sees no cancel
            await wait_until(retried, what="the coordinator did not retry the cancel")
            if time.time() < sent_at + TRY_TOTAL:  # (a very slow restart leaves no window)
                assert app.names() == ["try-start"]
            app.gate.set()  # the try ends at the app; nobody can tell the new process

            async def rolled_back() -> bool:
                async with s.get(f"{api}/{xid}") as r:
                    return (await r.json())["status"] == "Rollbacked"

            await wait_until(rolled_back, timeout=TRY_TOTAL + 20)
        assert app.names() == ["try-start", "try-end", "cancel"]
        # never before the try's deadline: its start plus the app's total timeout
        assert app.events[-1][1] >= sent_at + TRY_TOTAL
    finally:
        await sidecar.stop()
