"""`sidecar.proxy.fetch`: one buffered call over a data-plane pool, against real loopback
servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from sidecar.config import ClusterConfig
from sidecar.errors import UpstreamTimeout, UpstreamUnavailable
from sidecar.metrics import Metrics
from sidecar.proxy.fetch import fetch
from sidecar.proxy.upstream import Cluster
from sidecar.schema import validate
from tests.component.servers import closed_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Server:
    """A raw HTTP/1.1 server; `handler(reader, writer, n)` answers request number n."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                self.requests += 1
                await self.handler(reader, writer, self.requests)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


def ok(body: bytes = b'{"status":"ok"}') -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[Server]]]:
    servers: list[Server] = []

    async def make(handler: Handler) -> Server:
        server = Server(handler)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.close()


def cluster_for(port: int) -> Cluster:
    cfg = validate(ClusterConfig, {"url": f"http://127.0.0.1:{port}"})
    return Cluster("test", cfg, Metrics())


async def call(cluster: Cluster, *, idempotent: bool = True, **kw: Any) -> Any:
    return await fetch(
        cluster, "POST", "/cb/commit", [("xid", "x")], b"{}",
        timeout=5.0, idempotent=idempotent, **kw,
    )  # fmt: skip


async def test_sequential_calls_share_one_keep_alive_connection(serve) -> None:
    async def answer(_r, writer, n: int) -> None:
        writer.write(ok(b'{"n":%d}' % n))

    server = await serve(answer)
    cluster = cluster_for(server.port)
    first = await call(cluster)
    second = await call(cluster)
    assert (first.status, first.body, second.body) == (200, b'{"n":1}', b'{"n":2}')
    assert server.connections == 1 and cluster.idle_count == 1
    cluster.close()


def hang_up_on_the_second(answer: bytes = ok()) -> Handler:
    async def handler(_r, writer, n: int) -> None:
        if n == 2:
            writer.close()  # as a peer closing an idle keep-alive connection would
        else:
            writer.write(answer)

    return handler


async def test_an_idempotent_call_on_a_dead_keep_alive_connection_goes_again(serve) -> None:
    server = await serve(hang_up_on_the_second())
    cluster = cluster_for(server.port)
    await call(cluster)
    response = await call(cluster)
    assert response.status == 200
    assert server.requests == 3 and server.connections == 2


async def test_other_calls_on_a_dead_keep_alive_connection_are_not_repeated(serve) -> None:
    server = await serve(hang_up_on_the_second())
    cluster = cluster_for(server.port)
    await call(cluster, idempotent=False)
    with pytest.raises(UpstreamUnavailable, match="closed before responding"):
        await call(cluster, idempotent=False)
    assert server.requests == 2


async def test_no_answer_is_a_total_timeout_and_the_connection_is_dropped(serve) -> None:
    async def never(_r, _w, _n: int) -> None:
        await asyncio.Event().wait()

    server = await serve(never)
    cluster = cluster_for(server.port)
    with pytest.raises(UpstreamTimeout) as err:
        await fetch(cluster, "POST", "/cb", [], b"", timeout=0.2, idempotent=True)
    assert err.value.kind == "total"
    assert cluster.idle_count == 0 and cluster.in_use == 0


async def test_an_oversized_answer_is_refused(serve) -> None:
    async def big(_r, writer, _n: int) -> None:
        writer.write(ok(b"x" * 10_000))

    server = await serve(big)
    cluster = cluster_for(server.port)
    with pytest.raises(UpstreamUnavailable, match="larger than 1000 bytes"):
        await call(cluster, max_body=1000)
    assert cluster.idle_count == 0 and cluster.in_use == 0


async def test_a_fresh_connection_closed_before_answering_is_not_repeated(serve) -> None:
    async def hang_up(_r, writer, _n: int) -> None:
        writer.close()

    server = await serve(hang_up)
    cluster = cluster_for(server.port)
    with pytest.raises(UpstreamUnavailable, match="closed before responding"):
        await call(cluster)
    assert server.requests == 1  # a POST that may have arrived is not sent twice


async def test_connection_refused_is_upstream_unavailable() -> None:
    cluster = cluster_for(closed_port())
    with pytest.raises(UpstreamUnavailable, match="cannot connect"):
        await call(cluster)
    assert cluster.in_use == 0


async def test_an_invalid_response_is_upstream_unavailable(serve) -> None:
    async def garbage(_r, writer, _n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: nope\r\n\r\n")

    server = await serve(garbage)
    cluster = cluster_for(server.port)
    with pytest.raises(UpstreamUnavailable, match="invalid response"):
        await call(cluster)
