"""Java's java.net.http.HttpClient through the inbound listener, as a Java service calls
another: the default client, whose default version is HTTP/2. On a plain-text URL its first
request on a connection offers an upgrade (`Upgrade: h2c`, with the body); the sidecar must
serve it in HTTP/1.1 (before this was fixed, every such call got 501), deliver the body,
and serve the next request on the same connection.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tests.component.servers import Received, Reply, UpstreamFactory
from tests.component.test_abandon import ORDERS, PATIENT


async def java(client: list[str], *args: str) -> list[list[str]]:
    proc = await asyncio.create_subprocess_exec(*client, *args, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, out
    return [line.split(" ", 5) for line in out.decode().splitlines()]


async def test_a_java_post_offering_http2_is_served_with_its_body(
    sidecar_factory: Any, upstream: UpstreamFactory, java_client: list[str]
) -> None:
    async def echo(req: Received, reply: Reply) -> None:
        await reply.send(200, b"got:" + req.body)

    app = await upstream(echo)
    sc = await sidecar_factory({"app": {"url": app.url}})
    url = f"http://127.0.0.1:{sc.ports['inbound']}/items"
    lines = await java(java_client, "POST", url, '{"sku":"A-1"}')
    assert lines == [["STATUS", "200", "HTTP_1_1", "-", "-", 'got:{"sku":"A-1"}']] * 2
    assert [r.body for r in app.requests] == [b'{"sku":"A-1"}'] * 2
    assert all(not {"upgrade", "http2-settings"} & r.names() for r in app.requests)


async def test_a_java_order_is_committed_each_time(
    sidecar_factory: Any, upstream: UpstreamFactory, java_client: list[str]
) -> None:
    async def created(req: Received, reply: Reply) -> None:
        await reply.send(201, b'{"id":"1"}', [("Content-Type", "application/json")])

    app = await upstream(created)
    sc = await sidecar_factory({"app": {"url": app.url, **PATIENT}, **ORDERS})
    url = f"http://127.0.0.1:{sc.ports['inbound']}/orders"
    lines = await java(java_client, "POST", url, "{}")
    assert [(code, outcome) for _, code, _, _, outcome, _ in lines] == [("201", "Committed")] * 2
    xids = [xid for _, _, _, xid, _, _ in lines]
    assert [r.get("XID") for r in app.requests] == xids
    assert len(set(xids)) == 2
