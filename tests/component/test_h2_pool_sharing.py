"""Requests to an HTTP/2 upstream that find no connection with room wait for the connection
being opened instead of each opening one: a burst of first requests shares one connection.
When that connection cannot be opened, every request waiting for it gets its failure at
once (not a connection attempt each, one after another)."""

from __future__ import annotations

import asyncio

from tests.component.servers import Client, closed_port, error_of, get
from tests.component.test_h2_upstream_fields import RawH2Upstream


class CountingH2Upstream(RawH2Upstream):
    def __init__(self) -> None:
        super().__init__(lambda path: [])
        self.connections = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await super()._serve(reader, writer)


async def burst(port: int, n: int) -> list[int]:
    """`n` clients send a request each before any reads its answer."""
    clients = [await Client.connect(port) for _ in range(n)]
    try:
        for i, client in enumerate(clients):
            await client.send(get(f"/r{i}"))
        return [(await client.response()).status for client in clients]
    finally:
        for client in clients:
            client.close()


async def test_a_burst_of_first_requests_shares_one_new_connection(sidecar_factory):
    up = CountingH2Upstream()
    try:
        sc = await sidecar_factory({"app": {"url": await up.start(), "protocol": "h2c"}})
        assert await burst(sc.ports["inbound"], 12) == [200] * 12
        assert sorted(up.paths) == sorted(f"/r{i}" for i in range(12))
        assert up.connections == 1
    finally:
        await up.close()


async def test_requests_waiting_for_a_refused_connection_all_get_its_502(sidecar_factory):
    port = closed_port()
    sc = await sidecar_factory(
        {"app": {"url": f"http://127.0.0.1:{port}", "protocol": "h2c", "retries": {"attempts": 0}}}
    )
    clients = [await Client.connect(sc.ports["inbound"]) for _ in range(6)]
    try:
        for client in clients:
            await client.send(get("/x"))
        answers = [await client.response() for client in clients]
    finally:
        for client in clients:
            client.close()
    assert [resp.status for resp in answers] == [502] * 6
    assert all("cannot connect" in error_of(resp)["message"] for resp in answers)


async def test_requests_waiting_for_a_hung_connect_all_get_its_connect_timeout(
    sidecar_factory, unaccepting_port
):
    """The connect hangs (a full accept backlog) until its 300 ms timeout: every request
    waiting for that connection is told of that timeout then. Had each waited for the failure
    and then tried a connection of its own, one after another, the later ones would reach
    their 700 ms total timeout first."""
    timeouts = {"connect": "300ms", "response_header": "600ms", "total": "700ms"}
    sc = await sidecar_factory(
        {
            "app": {
                "url": f"http://127.0.0.1:{unaccepting_port}",
                "protocol": "h2c",
                "timeouts": timeouts,
                "retries": {"attempts": 0},
            }
        }
    )
    clients = [await Client.connect(sc.ports["inbound"]) for _ in range(5)]
    try:
        for client in clients:
            await client.send(get("/x"))
        answers = [await client.response(timeout=10) for client in clients]
    finally:
        for client in clients:
            client.close()
    assert [resp.status for resp in answers] == [504] * 5
    assert all("connect timeout" in error_of(resp)["message"] for resp in answers)
