"""Fixtures of the component tests: the scriptable upstream app and raw client connections,
each closed when the test ends."""

from __future__ import annotations

import select
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from tests.component.servers import Client, UpstreamFactory


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamFactory]:
    factory = UpstreamFactory()
    yield factory
    await factory.close()


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[int], Awaitable[Client]]]:
    """`await connect(port)`: a raw HTTP/1.1 client connection, aborted at the test's end."""
    clients: list[Client] = []

    async def make(port: int) -> Client:
        client = await Client.connect(port)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def unaccepting_port() -> Iterator[int]:
    """A listening socket whose accept backlog is full: connects to it hang (SYNs dropped)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(16):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            fillers.append(c)
            _, writable, _ = select.select([], [c], [], 0.1)
            if not writable:
                break  # this one hangs: the backlog is full
        else:
            pytest.skip("cannot fill a listen backlog on this kernel")
        yield port
    finally:
        for c in fillers:
            c.close()
        server.close()
