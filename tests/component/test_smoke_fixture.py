from aiohttp import web

from tests.conftest import raw_request


async def test_inbound_forwards_to_app(sidecar_factory, aiohttp_server):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=request.headers.get("XID", "-"))

    app = web.Application()
    app.router.add_get("/", handler)
    server = await aiohttp_server(app)
    sc = await sidecar_factory({"app": {"url": f"http://127.0.0.1:{server.port}"}})
    resp = await raw_request(
        sc.ports["inbound"],
        b"GET / HTTP/1.1\r\nHost: x\r\nX-GTS-XID: 10.1.1.1:8091:7\r\nConnection: close\r\n\r\n",
    )
    assert resp.startswith(b"HTTP/1.1 200")
    assert resp.endswith(b"10.1.1.1:8091:7")
