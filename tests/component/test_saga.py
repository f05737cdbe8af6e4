"""Saga through one sidecar and its local coordinator: actions register SAGA branches; a
rollback compensates them in reverse order, through the fence; a commit never calls them."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from tests.component.servers import free_port


async def _until(predicate, timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


async def test_saga_compensates_in_reverse_order_and_never_on_commit(
    sidecar_factory, aiohttp_server
) -> None:
    calls: list[str] = []
    holder: dict[str, int] = {}

    async def book(request: web.Request) -> web.Response:
        xid = request.headers["XID"]
        base = f"http://127.0.0.1:{holder['outbound']}/self"
        async with aiohttp.ClientSession() as s:
            for step in ("step1", "step2", "step3"):
                async with s.post(f"{base}/{step}", headers={"XID": xid}, data=step) as r:
                    assert r.status == 200
        fail = request.query.get("fail") is not None
        return web.Response(status=500 if fail else 201)

    async def step(request: web.Request) -> web.Response:
        calls.append(request.path)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/book", book)
    app.router.add_post("/{name}", step)
    app.router.add_post("/{name}/undo", step)
    server = await aiohttp_server(app)
    inbound_port = free_port()  # known before start: the app calls its own sidecar
    sc = await sidecar_factory(
        {
            "listeners": {"inbound": {"bind": f"127.0.0.1:{inbound_port}"}},
            "upstreams": {"self": {"url": f"http://127.0.0.1:{inbound_port}"}},
            "app": {"url": f"http://127.0.0.1:{server.port}"},
            "transactions": [
                {"match": {"method": "POST", "path": "/book"}, "name": "trip", "timeout": "30s"}
            ],
            "saga": [
                {
                    "resource": name,
                    "action": {"method": "POST", "path": f"/{name}"},
                    "compensation": {"method": "POST", "path": f"/{name}/undo"},
                }
                for name in ("step1", "step2", "step3")
            ],
            "local_coordinator": {"phase_two": {"initial": "10ms", "max": "50ms"}},
        }
    )
    holder["outbound"] = sc.ports["outbound"]
    async with aiohttp.ClientSession() as s:
        inbound = f"http://127.0.0.1:{sc.ports['inbound']}"
        async with s.post(f"{inbound}/book") as r:
            assert r.status == 201
            assert r.headers["x-gts-transaction-status"] == "Committed"
        assert calls == ["/step1", "/step2", "/step3"]  # commit: no compensation

        calls.clear()
        async with s.post(f"{inbound}/book?fail=1") as r:
            assert r.status == 500
            assert r.headers["x-gts-transaction-status"] == "Rollbacked"
        await _until(lambda: len(calls) == 6)
        assert calls == [
            "/step1", "/step2", "/step3",
            "/step3/undo", "/step2/undo", "/step1/undo",
        ]  # fmt: skip
