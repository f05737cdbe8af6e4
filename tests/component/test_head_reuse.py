"""An upstream connection that answered a HEAD request is reused: llhttp reads the answer's
Content-Length as a body to come (it is not told the request was HEAD), so the connection's
next answer is parsed on a new parser. Before, every HEAD (a health check, say) cost a new
upstream connection. An answer without Content-Length keeps the connection too (llhttp would
read it as a body running to the close), unless its Connection field says close. An upstream
that sends bytes after a HEAD answer's head is not reused."""

from __future__ import annotations

from tests.component.servers import Received, Reply, get, request


async def head_answered_with(sidecar_factory, upstream, head: bytes):
    """An app that answers HEAD with exactly `head` (no body) and anything else with 200
    "hello", behind a sidecar: (the app, the inbound port)."""

    async def answer(req: Received, reply: Reply) -> None:
        if req.method == "HEAD":
            reply.write(head)
            await reply.drain()
        else:
            await reply.send(200, b"hello")

    app = await upstream(answer)
    sc = await sidecar_factory({"app": {"url": app.url}})
    return app, sc.ports["inbound"]


async def test_the_connection_that_answered_a_head_serves_the_next_request(
    sidecar_factory, upstream
):
    app, port = await head_answered_with(
        sidecar_factory, upstream, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    )
    first = await request(port, get("/h", method="HEAD"), method="HEAD")
    assert first.status == 200 and first.get("content-length") == "5" and first.body == b""
    second = await request(port, get("/g"))
    assert second.status == 200 and second.body == b"hello"
    assert await request(port, get("/h", method="HEAD"), method="HEAD")
    assert [r.method for r in app.requests] == ["HEAD", "GET", "HEAD"]
    assert len({r.conn_id for r in app.requests}) == 1


async def test_bytes_after_a_head_answer_keep_the_connection_from_reuse(sidecar_factory, upstream):
    async def answer(req: Received, reply: Reply) -> None:
        if req.method == "HEAD":  # a broken upstream: the body a HEAD answer must not have
            await reply.send(200, b"hello")
        else:
            await reply.send(200, b"fine")

    app = await upstream(answer)
    sc = await sidecar_factory({"app": {"url": app.url}})
    port = sc.ports["inbound"]
    first = await request(port, get("/h", method="HEAD"), method="HEAD")
    assert first.status == 200 and first.body == b""
    second = await request(port, get("/g"))
    assert second.status == 200 and second.body == b"fine"
    assert app.requests[0].conn_id != app.requests[1].conn_id


async def test_a_head_answer_without_content_length_keeps_the_connection(sidecar_factory, upstream):
    app, port = await head_answered_with(
        sidecar_factory, upstream, b"HTTP/1.1 200 OK\r\nX-Kind: probe\r\n\r\n"
    )
    first = await request(port, get("/h", method="HEAD"), method="HEAD")
    assert first.status == 200 and first.get("x-kind") == "probe" and first.body == b""
    second = await request(port, get("/g"))
    assert second.status == 200 and second.body == b"hello"
    assert len({r.conn_id for r in app.requests}) == 1


async def test_a_head_answer_that_says_close_is_not_reused(sidecar_factory, upstream):
    app, port = await head_answered_with(
        sidecar_factory, upstream, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
    )
    assert (await request(port, get("/h", method="HEAD"), method="HEAD")).status == 200
    assert (await request(port, get("/g"))).body == b"hello"
    assert app.requests[0].conn_id != app.requests[1].conn_id
