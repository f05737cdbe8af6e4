"""HTTP/1.0 clients that ask for keep-alive (`ab -k`, old load balancers' health checks):
the response must say `Connection: keep-alive`, or the client, which by HTTP/1.0 rules
expects the server to close, waits for a close that never comes (RFC 9112 Appendix C.2.2).
Without the request's keep-alive, the response closes the connection."""

from __future__ import annotations

from tests.component.servers import Client, Received, Reply, UpstreamFactory


async def test_an_http10_keep_alive_client_is_told_and_served_twice(sidecar_factory, upstream):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    async with await Client.connect(sc.ports["inbound"]) as client:
        for path in (b"/one", b"/two"):
            await client.send(b"GET " + path + b" HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            resp = await client.response()
            assert resp.status == 200
            assert resp.get("connection") == "keep-alive"
    assert [r.target for r in app.requests] == ["/one", "/two"]


async def test_an_http10_keep_alive_client_is_told_on_a_sidecar_error_too(
    sidecar_factory, upstream
):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    async with await Client.connect(sc.ports["inbound"]) as client:
        await client.send(
            b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\nXID: 10.0.0.1:8091:\r\n\r\n"
        )
        resp = await client.response()
        assert resp.status == 400
        assert resp.get("connection") == "keep-alive"
        await client.send(b"GET /y HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert (await client.response()).status == 200


async def test_an_http10_client_without_keep_alive_gets_its_close(
    sidecar_factory, upstream: UpstreamFactory
):
    async def ok(req: Received, reply: Reply) -> None:
        await reply.send(200, b"ok")

    app = await upstream(ok)
    sc = await sidecar_factory({"app": {"url": app.url}})
    async with await Client.connect(sc.ports["inbound"]) as client:
        await client.send(b"GET /x HTTP/1.0\r\n\r\n")
        resp = await client.response()
        assert resp.status == 200
        assert resp.get("connection") == "close"
        assert await client.closed()
