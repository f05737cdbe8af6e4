"""Fixtures of the component tests: the scriptable upstream app and raw client connections,
each closed when the test ends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

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
