"""The inbound branch filter's refusals: never forward a try that is not safely registered."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from tests.component.servers import closed_port

TCC = [
    {
        "resource": "inv",
        "try": {"method": "POST", "path": "/try"},
        "confirm": {"method": "POST", "path": "/confirm"},
        "cancel": {"method": "POST", "path": "/cancel"},
        "max_application_data": "1KiB",
    }
]


async def _app(aiohttp_server, calls: list[str]):
    async def handler(request: web.Request) -> web.Response:
        calls.append(request.path)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    return await aiohttp_server(app)


async def test_registration_failure_is_503_and_the_try_is_not_forwarded(
    sidecar_factory, aiohttp_server
) -> None:
    calls: list[str] = []
    server = await _app(aiohttp_server, calls)
    dead = f"http://127.0.0.1:{closed_port()}"
    sc = await sidecar_factory(
        {
            "app": {"url": f"http://127.0.0.1:{server.port}"},
            "coordinator": {"endpoints": [dead]},
            "tcc": TCC,
        }
    )
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"http://127.0.0.1:{sc.ports['inbound']}/try",
            headers={"XID": f"127.0.0.1:{closed_port()}:5"},
            data=b"{}",
        ) as r:
            assert r.status == 503
            assert r.headers["x-gts-sidecar-error"] == "COORDINATOR_UNAVAILABLE"
            assert "not forwarded" in (await r.json())["error"]["message"]
    assert calls == []


async def test_oversized_try_is_413_and_an_ended_transaction_409(
    sidecar_factory, aiohttp_server
) -> None:
    calls: list[str] = []
    server = await _app(aiohttp_server, calls)
    sc = await sidecar_factory({"app": {"url": f"http://127.0.0.1:{server.port}"}, "tcc": TCC})
    engine = sc.control.engine
    tx = await engine.begin("t", 60_000)
    inbound = f"http://127.0.0.1:{sc.ports['inbound']}/try"
    async with aiohttp.ClientSession() as s:
        async with s.post(inbound, headers={"XID": tx.xid}, data=b"x" * 4096) as r:
            assert r.status == 413
        await engine.rollback(tx.xid)
        async with s.post(inbound, headers={"XID": tx.xid}, data=b"{}") as r:
            assert r.status == 409
            assert r.headers["x-gts-sidecar-error"] == "TRANSACTION_NOT_ACTIVE"
    assert calls == []
