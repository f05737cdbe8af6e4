"""XID owners are not addresses a client chooses (issue 12, F2), over real loopback sockets.

A TCC try names its XID, and so its owner host:port. With the cluster healthy, the branch is
registered with the cluster whatever the owner says; a peer sidecar is called only while the
cluster is down, only inside `degraded.peer_networks` (default: none), only on the peer port;
peer clients live in a bounded cache; a peer's answer that lacks what the call needs is a
clear error, never an exception in a task. Fake peers listen on 127.0.0.2 with the
participant's own peer port number (its peer listener is bound to 127.0.0.1 only)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.component.servers import closed_port

TCC = [
    {
        "resource": "inv",
        "try": {"method": "POST", "path": "/deduct"},
        "confirm": {"method": "POST", "path": "/deduct/confirm"},
        "cancel": {"method": "POST", "path": "/deduct/cancel"},
    }
]
FAST = {"connect": "300ms", "request": "1s"}


class FakeCoordinator:
    """Answers every GTS REST call with `answer` (status, JSON) and records what it got."""

    def __init__(self, answer: tuple[int, Any] = (200, {"branchId": "5"})) -> None:
        self.answer = answer
        self.calls: list[str] = []
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append(f"{request.method} {request.path}")
        status, body = self.answer
        return web.json_response(body, status=status)

    async def start(self, host: str, port: int) -> FakeCoordinator:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, host, port).start()
        return self

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def fakes() -> AsyncIterator[Callable[..., Awaitable[FakeCoordinator]]]:
    started: list[FakeCoordinator] = []

    async def make(host: str, port: int, **kw: Any) -> FakeCoordinator:
        fake = await FakeCoordinator(**kw).start(host, port)
        started.append(fake)
        return fake

    yield make
    for fake in started:
        await fake.close()


async def app_server(aiohttp_server: Any, calls: list[str]) -> Any:
    async def handler(request: web.Request) -> web.Response:
        calls.append(request.path)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return await aiohttp_server(app)


async def participant(sidecar_factory: Any, app: Any, cluster: str, **degraded: Any) -> Any:
    return await sidecar_factory(
        {
            "app": {"url": f"http://127.0.0.1:{app.port}"},
            "coordinator": {"endpoints": [cluster], "timeouts": FAST},
            "degraded": degraded,
            "tcc": TCC,
        }
    )


async def try_with(sc: Any, xid: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"http://127.0.0.1:{sc.ports['inbound']}/deduct", headers={"XID": xid}, data=b"{}"
        ) as r:
            body = await r.json() if r.content_type == "application/json" else {}
            return r.status, body


async def test_with_the_cluster_healthy_the_owner_named_by_the_client_is_never_called(
    sidecar_factory, aiohttp_server, fakes
):
    calls: list[str] = []
    app = await app_server(aiohttp_server, calls)
    cluster = await fakes("127.0.0.1", 0)
    assert cluster.runner is not None
    cluster_port = cluster.runner.addresses[0][1]
    sc = await participant(
        sidecar_factory, app, f"http://127.0.0.1:{cluster_port}", peer_networks=["127.0.0.0/8"]
    )
    victim = await fakes("127.0.0.2", sc.ports["peer"])  # in the networks, on the peer port
    status, _ = await try_with(sc, f"127.0.0.2:{sc.ports['peer']}:42")
    assert status == 200
    assert cluster.calls[0] == "POST /api/v1/branch/register"
    assert victim.calls == []
    assert calls == ["/deduct"]


async def test_by_default_no_peer_is_ever_called(sidecar_factory, aiohttp_server, fakes):
    calls: list[str] = []
    app = await app_server(aiohttp_server, calls)
    sc = await participant(sidecar_factory, app, f"http://127.0.0.1:{closed_port()}")
    victim = await fakes("127.0.0.2", sc.ports["peer"])
    for _ in range(3):
        status, body = await try_with(sc, f"127.0.0.2:{sc.ports['peer']}:42")
        assert status == 503
        assert body["error"]["code"] == "COORDINATOR_UNAVAILABLE"
    assert victim.calls == []
    assert calls == []


async def test_a_peer_is_called_only_on_the_peer_port(sidecar_factory, aiohttp_server, fakes):
    calls: list[str] = []
    app = await app_server(aiohttp_server, calls)
    sc = await participant(
        sidecar_factory, app, f"http://127.0.0.1:{closed_port()}", peer_networks=["127.0.0.0/8"]
    )
    other = await fakes("127.0.0.2", 0)  # an internal service on another port
    assert other.runner is not None
    port = other.runner.addresses[0][1]
    status, _ = await try_with(sc, f"127.0.0.2:{port}:42")
    assert status == 503
    assert other.calls == []
    assert calls == []


async def test_with_the_cluster_down_an_eligible_peer_coordinates_the_branch(
    sidecar_factory, aiohttp_server, fakes
):
    calls: list[str] = []
    app = await app_server(aiohttp_server, calls)
    sc = await participant(
        sidecar_factory, app, f"http://127.0.0.1:{closed_port()}", peer_networks=["127.0.0.0/8"]
    )
    peer = await fakes("127.0.0.2", sc.ports["peer"])
    status, _ = await try_with(sc, f"127.0.0.2:{sc.ports['peer']}:42")
    assert status == 200
    assert peer.calls[0] == "POST /api/v1/branch/register"
    assert calls == ["/deduct"]


async def test_a_peer_answer_without_branch_id_is_a_clear_error_at_once(
    sidecar_factory, aiohttp_server, fakes, caplog
):
    calls: list[str] = []
    app = await app_server(aiohttp_server, calls)
    sc = await participant(
        sidecar_factory, app, f"http://127.0.0.1:{closed_port()}", peer_networks=["127.0.0.0/8"]
    )
    peer = await fakes("127.0.0.2", sc.ports["peer"], answer=(200, {}))
    xid = f"127.0.0.2:{sc.ports['peer']}:42"
    status, body = await try_with(sc, xid)
    assert status in (502, 503)
    assert "branchId" in body["error"]["message"]
    assert calls == []
    # a decision the peer answers without its fields: 502, not an exception
    async with aiohttp.ClientSession() as s:
        api = f"http://127.0.0.1:{sc.ports['api']}/v1/transactions/{xid}/commit"
        async with s.post(api) as r:
            assert r.status == 502
            assert (await r.json())["error"]["code"] == "COORDINATOR_INVALID_ANSWER"
    assert len(peer.calls) == 2
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


async def test_peer_clients_are_a_bounded_cache(sidecar_factory, aiohttp_server):
    calls: list[str] = []
    app = await app_server(aiohttp_server, calls)
    sc = await participant(
        sidecar_factory,
        app,
        f"http://127.0.0.1:{closed_port()}",
        peer_networks=["127.0.0.0/8"],
        max_peers=4,
    )
    for i in range(2, 22):  # twenty owners, none listening
        status, _ = await try_with(sc, f"127.0.0.{i}:{sc.ports['peer']}:42")
        assert status == 503
    assert len(sc.control.router._peers) == 4
    assert calls == []
