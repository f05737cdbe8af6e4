"""nginx as an HTTP/2 server behind the sidecar (h2c, `listen ... http2`): the app, or an
outbound upstream.

nginx ends an HTTP/2 connection after `keepalive_requests` streams (1000 by default) with a
GOAWAY whose last stream id is the stream that reached the limit, and answers that stream
after the GOAWAY; streams the client had opened beyond it are dropped unprocessed. When idle
past `keepalive_timeout` it sends a GOAWAY and closes.
"""

from __future__ import annotations

from typing import Any

from tests.component.servers import get, wait_until
from tests.realpeers.conftest import Nginx
from tests.realpeers.peers import GOOD_XID, H2_SERVER, fields, idle, retries, xid


async def h2c_nginx_app(
    sidecar_factory: Any, nginx: Any, *, keepalive_timeout: str = "75s", keepalive_requests: int
) -> tuple[Any, Nginx]:
    server = await nginx(
        H2_SERVER, keepalive_timeout=keepalive_timeout, keepalive_requests=keepalive_requests
    )
    pool = {"max_connections": 20, "max_idle": 20, "idle_timeout": "5m"}
    sc = await sidecar_factory({"app": {"url": server.url, "protocol": "h2c", "pool": pool}})
    return sc, server


async def test_an_h2c_nginx_app_closing_after_its_keepalive_requests_answers_every_request(
    sidecar_factory, connect, nginx
):
    """After `keepalive_requests` streams nginx sends GOAWAY (NO_ERROR, last stream = the
    one it just took) and then that stream's answer: the answer must reach the client (h2
    used to close the connection's state on the GOAWAY and refuse the answer: a 502 for a
    request nginx had served, once per `keepalive_requests`, 1000 by default)."""
    sc, server = await h2c_nginx_app(sidecar_factory, nginx, keepalive_requests=3)
    client = await connect(sc.ports["inbound"])
    for i in range(7):
        await client.send(get(f"/r{i}", f"XID: {GOOD_XID}", f"X-Req: {i}"))
        resp = await client.response()
        assert resp.status == 200 and resp.body == b"ok\n", resp.body
    lines = [fields(line) for line in await server.wait_log_lines(7)]
    assert [line["req"] for line in lines] == [str(i) for i in range(7)]
    assert [line["xid"] for line in lines] == [GOOD_XID] * 7
    assert [line["n"] for line in lines] == ["1", "2", "3", "1", "2", "3", "1"]
    assert retries(sc) == 0


async def concurrent_after_warm_up(sc: Any, connect: Any, method: str, n: int) -> list[Any]:
    """One request to open a connection, then `n` at once, all on it (nginx lets up to 128
    streams run on a connection): with `keepalive_requests 3` nginx takes two of them and
    refuses the rest with its GOAWAY."""
    warm = await connect(sc.ports["inbound"])
    await warm.send(get("/warm"))
    assert (await warm.response()).status == 200
    clients = [await connect(sc.ports["inbound"]) for _ in range(n)]
    body = b"{}" if method == "POST" else None
    for i, client in enumerate(clients):
        await client.send(get("/r", f"X-Req: {i}", method=method, body=body))
    return [await client.response() for client in clients]


async def test_gets_refused_by_an_nginx_goaway_are_retried_on_a_new_connection(
    sidecar_factory, connect, nginx
):
    sc, server = await h2c_nginx_app(sidecar_factory, nginx, keepalive_requests=3)
    answers = await concurrent_after_warm_up(sc, connect, "GET", 10)
    assert [resp.status for resp in answers] == [200] * 10, [r.body for r in answers]
    lines = [fields(line) for line in await server.wait_log_lines(11)]
    assert sorted(line["req"] for line in lines[1:]) == sorted(str(i) for i in range(10))


async def test_a_post_nginx_served_before_its_goaway_is_never_answered_with_an_error(
    sidecar_factory, connect, nginx
):
    """Of concurrent POSTs on a connection nginx ends with a GOAWAY, those it took (stream
    ids up to the GOAWAY's last) are answered 200; only those it never saw may fail."""
    sc, server = await h2c_nginx_app(sidecar_factory, nginx, keepalive_requests=3)
    answers = await concurrent_after_warm_up(sc, connect, "POST", 10)
    served = [i for i, resp in enumerate(answers) if resp.status == 200]
    assert len(served) >= 2
    lines = [fields(line) for line in await server.wait_log_lines(1 + len(served))]
    assert sorted(int(line["req"]) for line in lines[1:]) == served
    for resp in answers:
        assert resp.status in (200, 502)


async def test_posts_refused_by_an_nginx_goaway_are_retried_on_a_new_connection(
    sidecar_factory, connect, nginx
):
    """A request nginx refused with its GOAWAY (a stream id above the GOAWAY's last) was never
    processed and may go again whatever its method (RFC 9113 section 8.7): each POST is
    answered 200 and reaches nginx exactly once."""
    sc, server = await h2c_nginx_app(sidecar_factory, nginx, keepalive_requests=3)
    answers = await concurrent_after_warm_up(sc, connect, "POST", 10)
    assert [resp.status for resp in answers] == [200] * 10, [r.body for r in answers]
    lines = [fields(line) for line in await server.wait_log_lines(11)]
    assert sorted(line["req"] for line in lines[1:]) == sorted(str(i) for i in range(10))


async def test_concurrent_first_requests_to_an_h2c_nginx_share_one_connection(
    sidecar_factory, connect, nginx
):
    """Requests that find no HTTP/2 connection with room wait for the one being opened (it
    will have room: nginx allows 128 streams) instead of each opening its own."""
    sc, server = await h2c_nginx_app(sidecar_factory, nginx, keepalive_requests=1000)
    clients = [await connect(sc.ports["inbound"]) for _ in range(10)]
    for i, client in enumerate(clients):
        await client.send(get("/r", f"X-Req: {i}"))
    assert [(await client.response()).status for client in clients] == [200] * 10
    lines = [fields(line) for line in await server.wait_log_lines(10)]
    assert len({line["conn"] for line in lines}) == 1


async def test_an_h2c_connection_nginx_closed_idle_leaves_the_pool(sidecar_factory, connect, nginx):
    """`keepalive_timeout 1s` on HTTP/2: nginx sends GOAWAY and closes the idle connection;
    the pool drops it, and the next request goes on a new one without a retry."""
    sc, server = await h2c_nginx_app(
        sidecar_factory, nginx, keepalive_timeout="1s", keepalive_requests=100
    )
    client = await connect(sc.ports["inbound"])
    await client.send(get("/first"))
    assert (await client.response()).status == 200
    assert idle(sc) == 1
    await wait_until(lambda: idle(sc) == 0, timeout=15)
    await client.send(get("/second"))
    assert (await client.response()).status == 200
    first, second = (fields(line) for line in await server.wait_log_lines(2))
    assert first["conn"] != second["conn"]
    assert retries(sc) == 0


# --- an outbound upstream ------------------------------------------------------------------------


async def test_the_outbound_listener_forwards_the_xid_to_an_h2c_nginx_across_its_goaways(
    sidecar_factory, connect, nginx
):
    server = await nginx(H2_SERVER, keepalive_timeout="75s", keepalive_requests=2)
    sc = await sidecar_factory({"upstreams": {"orders": {"url": server.url, "protocol": "h2c"}}})
    client = await connect(sc.ports["outbound"])
    for i in range(5):
        await client.send(get(f"/orders/items/{i}", f"XID: {xid(i)}"))
        resp = await client.response()
        assert resp.status == 200 and resp.body == b"ok\n", resp.body
    lines = [fields(line) for line in await server.wait_log_lines(5)]
    assert [line["xid"] for line in lines] == [xid(i) for i in range(5)]
    assert [line["n"] for line in lines] == ["1", "2", "1", "2", "1"]
    assert retries(sc, "orders") == 0
