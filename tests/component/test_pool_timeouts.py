"""Upstream pools, timeouts and retries over real loopback sockets (outbound listener).

Timeouts under test are 200-600 ms; every wait in these tests is either a condition polled
until it holds or an upper bound at least ten times the timeout under test.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.component.servers import (
    Client,
    Received,
    Reply,
    SocketClient,
    Upstream,
    UpstreamFactory,
    closed_port,
    error_of,
    get,
    request,
    sample,
    stall_forever,
    wait_until,
)


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamFactory]:
    factory = UpstreamFactory()
    yield factory
    await factory.close()


async def sidecar_for(sidecar_factory: Any, url: str, **orders: Any) -> tuple[Any, int]:
    sc = await sidecar_factory({"upstreams": {"orders": {"url": url, **orders}}})
    return sc, sc.ports["outbound"]


def metric(sc: Any, name: str, **labels: str) -> float:
    return sample(sc, f"gts_sidecar_{name}", **labels)


async def gated(req: Received, reply: Reply) -> None:
    """Hold every request until the test opens the upstream's gate."""
    await reply.upstream.gate.wait()
    await reply.send(200, req.target.encode())


# --- the pool ------------------------------------------------------------------------------------


async def test_connection_cap_is_respected_and_waiters_are_served(sidecar_factory, upstream):
    up = await upstream(gated)
    sc, port = await sidecar_for(
        sidecar_factory, up.url, pool={"max_connections": 2, "max_idle": 2}
    )
    tasks = [asyncio.ensure_future(request(port, get(f"/orders/{i}"))) for i in range(6)]
    try:
        # two requests reach the upstream, the other four wait for a pooled connection
        await wait_until(
            lambda: (
                up.in_flight == 2 and metric(sc, "pool_requests_waiting", upstream="orders") == 4
            )
        )
        assert up.max_open == 2
        up.gate.set()
        responses = await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    assert sorted(r.body for r in responses) == sorted(f"/{i}".encode() for i in range(6))
    assert up.max_open == 2
    assert up.connections == 2  # the waiters were handed the two kept-alive connections
    assert metric(sc, "pool_requests_waiting", upstream="orders") == 0


async def test_sequential_requests_reuse_one_keep_alive_connection(sidecar_factory, upstream):
    up = await upstream()
    sc, port = await sidecar_for(sidecar_factory, up.url)
    for i in range(5):  # a new client connection each time: the pool is per upstream
        assert (await request(port, get(f"/orders/{i}"))).status == 200
    assert len(up.requests) == 5
    assert up.connections == 1
    assert metric(sc, "pool_connections_idle", upstream="orders") == 1


async def test_max_idle_zero_keeps_no_connection(sidecar_factory, upstream):
    up = await upstream()
    sc, port = await sidecar_for(sidecar_factory, up.url, pool={"max_idle": 0})
    for i in range(3):
        assert (await request(port, get(f"/orders/{i}"))).status == 200
    assert up.connections == 3


async def test_idle_connections_are_closed_after_idle_timeout(sidecar_factory, upstream):
    up = await upstream()
    sc, port = await sidecar_for(sidecar_factory, up.url, pool={"idle_timeout": "200ms"})
    assert (await request(port, get("/orders/1"))).status == 200
    assert up.open_now == 1
    await wait_until(lambda: up.open_now == 0, timeout=3.0)
    assert metric(sc, "pool_connections_idle", upstream="orders") == 0
    assert (await request(port, get("/orders/2"))).status == 200
    assert up.connections == 2


@pytest.mark.parametrize("max_pending", [0, 1])
async def test_pending_limit_exceeded_is_503_at_once(sidecar_factory, upstream, max_pending):
    up = await upstream(gated)
    sc, port = await sidecar_for(
        sidecar_factory,
        up.url,
        pool={"max_connections": 1, "max_idle": 1, "max_pending": max_pending},
    )
    holders = [asyncio.ensure_future(request(port, get("/orders/hold")))]
    try:
        await wait_until(lambda: up.in_flight == 1)
        for i in range(max_pending):
            holders.append(asyncio.ensure_future(request(port, get(f"/orders/wait{i}"))))
        await wait_until(
            lambda: metric(sc, "pool_requests_waiting", upstream="orders") == max_pending
        )
        started = time.monotonic()
        # the gate is still closed: only an immediate refusal can answer this
        refused = await request(port, get("/orders/one-too-many"), timeout=2.0)
        assert time.monotonic() - started < 1.0
        assert refused.status == 503
        assert error_of(refused)["code"] == "POOL_EXHAUSTED"
        assert metric(sc, "pool_exhausted_total", upstream="orders") == 1
        up.gate.set()
        assert [r.status for r in await asyncio.gather(*holders)] == [200] * (1 + max_pending)
    finally:
        for t in holders:
            t.cancel()
    assert "/one-too-many" not in [r.target for r in up.requests]


async def test_a_waiter_whose_client_resets_leaves_the_queue(sidecar_factory, upstream):
    up = await upstream(gated)
    sc, port = await sidecar_for(
        sidecar_factory,
        up.url,
        pool={"max_connections": 1, "max_idle": 1, "max_pending": 1},
    )
    holder = asyncio.ensure_future(request(port, get("/orders/hold")))
    try:
        await wait_until(lambda: up.in_flight == 1)
        # a waiter whose client goes away must not keep its place in the queue
        async with await Client.connect(port) as client:
            await client.send(get("/orders/gone"))
            await wait_until(lambda: metric(sc, "pool_requests_waiting", upstream="orders") == 1)
            client.reset()
        await wait_until(lambda: metric(sc, "pool_requests_waiting", upstream="orders") == 0)
        waiter = asyncio.ensure_future(request(port, get("/orders/waits")))
        await wait_until(lambda: metric(sc, "pool_requests_waiting", upstream="orders") == 1)
        up.gate.set()
        assert (await holder).status == 200
        assert (await waiter).status == 200
    finally:
        holder.cancel()
    assert "/gone" not in [r.target for r in up.requests]


# --- timeouts ------------------------------------------------------------------------------------


async def test_response_header_timeout_is_504_naming_it(sidecar_factory, upstream):
    up = await upstream(stall_forever)
    sc, port = await sidecar_for(
        sidecar_factory, up.url, timeouts={"response_header": "200ms", "total": "5s"}
    )
    started = time.monotonic()
    resp = await request(port, get("/orders/slow", method="POST", body=b"x"), timeout=2.0)
    elapsed = time.monotonic() - started
    assert resp.status == 504
    err = error_of(resp)
    assert err["code"] == "UPSTREAM_TIMEOUT"
    assert "response header" in err["message"]
    assert 0.19 <= elapsed < 2.0
    assert (
        metric(
            sc,
            "upstream_timeouts_total",
            listener="outbound",
            upstream="orders",
            kind="response_header",
        )
        == 1
    )
    # the stalled connection was dropped, never handed to the next request
    await wait_until(lambda: up.open_now == 0)


async def test_total_timeout_while_the_request_body_trickles_in_is_the_clients(
    sidecar_factory, upstream
):
    up = await upstream(stall_forever)
    sc, port = await sidecar_for(
        sidecar_factory,
        up.url,
        timeouts={"connect": "100ms", "response_header": "200ms", "total": "400ms"},
    )
    async with SocketClient(port) as client:
        await client.send(b"POST /orders/up HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
        started = time.monotonic()

        async def trickle() -> None:
            # a byte every 50 ms: never idle, never done (the response header timer is only
            # armed once the request is fully sent, so only the total timeout can fire)
            for _ in range(1000):
                if not await client.send(b"x"):
                    return
                await asyncio.sleep(0.05)

        feeder = asyncio.ensure_future(trickle())
        try:
            resp = await client.response(timeout=4.0)
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
        elapsed = time.monotonic() - started
    # the body never arrived in all that time: the client's fault, never the upstream's
    assert resp.status == 408
    err = error_of(resp)
    assert err["code"] == "REQUEST_TIMEOUT"
    assert "total" in err["message"]
    assert resp.get("connection") == "close"  # the rest of the body was never read
    assert 0.35 <= elapsed < 4.0
    assert (
        metric(sc, "upstream_timeouts_total", listener="outbound", upstream="orders", kind="total")
        == 0
    )
    assert metric(sc, "client_errors_total", listener="outbound", reason="body_timeout") == 1


async def test_total_timeout_fires_for_a_request_waiting_in_the_pool_queue(
    sidecar_factory, upstream
):
    async def head_then_stall(req: Received, reply: Reply) -> None:
        if req.target == "/hold":
            reply.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            await reply.drain()
        await asyncio.Event().wait()

    up = await upstream(head_then_stall)
    sc, port = await sidecar_for(
        sidecar_factory,
        up.url,
        pool={"max_connections": 1, "max_idle": 1},
        timeouts={"connect": "100ms", "response_header": "400ms", "total": "600ms"},
    )
    async with await Client.connect(port) as holder:
        await holder.send(get("/orders/hold"))
        await wait_until(lambda: up.in_flight == 1)
        started = time.monotonic()
        resp = await request(port, get("/orders/queued"), timeout=6.0)
        elapsed = time.monotonic() - started
    assert resp.status == 504
    err = error_of(resp)
    assert err["code"] == "UPSTREAM_TIMEOUT"
    assert "total" in err["message"]
    assert 0.5 <= elapsed < 6.0


async def test_total_timeout_after_the_head_was_sent_aborts_the_client(sidecar_factory, upstream):
    async def head_then_stall(req: Received, reply: Reply) -> None:
        reply.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nabc")
        await reply.drain()
        await asyncio.Event().wait()

    up = await upstream(head_then_stall)
    sc, port = await sidecar_for(
        sidecar_factory,
        up.url,
        timeouts={"connect": "100ms", "response_header": "200ms", "total": "300ms"},
    )
    async with await Client.connect(port) as client:
        await client.send(get("/orders/x"))
        data = await client.read_to_eof(timeout=3.0)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == b"abc"  # cut short, and nothing else written into it
    assert (
        metric(sc, "upstream_timeouts_total", listener="outbound", upstream="orders", kind="total")
        == 1
    )


async def test_a_hung_connect_is_cut_off_by_the_connect_timeout(sidecar_factory, unaccepting_port):
    sc, port = await sidecar_for(
        sidecar_factory,
        f"http://127.0.0.1:{unaccepting_port}",
        timeouts={"connect": "200ms", "response_header": "1s", "total": "5s"},
        retries={"attempts": 0},
    )
    started = time.monotonic()
    resp = await request(port, get("/orders/x"), timeout=3.0)
    elapsed = time.monotonic() - started
    # bounded by the connect timeout (200 ms), far below response_header and total
    assert 0.19 <= elapsed < 2.0
    assert resp.status in (502, 504)
    assert "connect timeout" in error_of(resp)["message"]


async def test_connect_timeout_is_504_naming_it(sidecar_factory, unaccepting_port):
    sc, port = await sidecar_for(
        sidecar_factory,
        f"http://127.0.0.1:{unaccepting_port}",
        timeouts={"connect": "200ms", "response_header": "1s", "total": "5s"},
        retries={"attempts": 0},
    )
    resp = await request(port, get("/orders/x"), timeout=3.0)
    assert resp.status == 504, resp.body
    err = error_of(resp)
    assert err["code"] == "UPSTREAM_TIMEOUT"
    assert "connect" in err["message"]
    assert (
        metric(
            sc, "upstream_timeouts_total", listener="outbound", upstream="orders", kind="connect"
        )
        == 1
    )


async def test_connect_refused_is_502(sidecar_factory):
    sc, port = await sidecar_for(
        sidecar_factory, f"http://127.0.0.1:{closed_port()}", retries={"attempts": 0}
    )
    resp = await request(port, get("/orders/x"))
    assert resp.status == 502
    err = error_of(resp)
    assert err["code"] == "UPSTREAM_UNAVAILABLE"
    assert "connect" in err["message"]


# --- retries -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "attempts", "retried"),
    [
        ("GET", 2, 2),
        ("DELETE", 1, 1),
        ("HEAD", 1, 1),
        ("GET", 0, 0),
        ("POST", 2, 0),
        ("PATCH", 2, 0),
    ],
)
async def test_connect_failures_retry_idempotent_requests_only(
    sidecar_factory, method, attempts, retried
):
    sc, port = await sidecar_for(
        sidecar_factory, f"http://127.0.0.1:{closed_port()}", retries={"attempts": attempts}
    )
    body = b"b" if method in ("POST", "PATCH") else None
    resp = await request(port, get("/orders/x", method=method, body=body), method=method)
    assert resp.status == 502
    assert metric(sc, "upstream_retries_total", upstream="orders") == retried


async def test_stale_keep_alive_connection_closed_after_a_response(sidecar_factory, upstream):
    async def close_after(req: Received, reply: Reply) -> None:
        await reply.send(200, req.target.encode())  # keep-alive framing, then a silent close
        reply.close()

    up = await upstream(close_after)
    sc, port = await sidecar_for(sidecar_factory, up.url)
    assert (await request(port, get("/orders/1"))).body == b"/1"
    await wait_until(lambda: up.open_now == 0)
    assert (await request(port, get("/orders/2"))).body == b"/2"
    assert up.connections == 2


def _race_closer(closed: list[int]):
    """The upstream closes its first connection as the second request arrives on it, without
    answering: the request reached a connection that was already going away."""

    async def handler(req: Received, reply: Reply) -> None:
        if req.conn_id == 1 and req.target != "/1":
            closed.append(req.conn_id)
            reply.close()
            return
        await reply.send(200, req.target.encode())

    return handler


async def test_get_on_a_connection_closed_under_it_is_retried(sidecar_factory, upstream):
    closed: list[int] = []
    up = await upstream(_race_closer(closed))
    sc, port = await sidecar_for(sidecar_factory, up.url, retries={"attempts": 0})
    async with await Client.connect(port) as client:
        await client.send(get("/orders/1"))
        assert (await client.response()).body == b"/1"
        await client.send(get("/orders/2"))
        resp = await client.response()
    assert resp.status == 200 and resp.body == b"/2"
    assert closed == [1]
    assert [(r.conn_id, r.target) for r in up.requests] == [(1, "/1"), (1, "/2"), (2, "/2")]
    assert metric(sc, "upstream_retries_total", upstream="orders") == 1


async def test_post_on_a_connection_closed_under_it_is_not_retried(sidecar_factory, upstream):
    closed: list[int] = []
    up = await upstream(_race_closer(closed))
    sc, port = await sidecar_for(sidecar_factory, up.url, retries={"attempts": 3})
    assert (await request(port, get("/orders/1"))).status == 200
    resp = await request(port, get("/orders/2", method="POST", body=b"once"))
    assert resp.status == 502
    assert error_of(resp)["code"] == "UPSTREAM_UNAVAILABLE"
    assert [(r.conn_id, r.target) for r in up.requests] == [(1, "/1"), (1, "/2")]
    assert metric(sc, "upstream_retries_total", upstream="orders") == 0


async def test_app_cluster_on_inbound_uses_the_same_pool_rules(sidecar_factory, upstream):
    up: Upstream = await upstream(stall_forever)
    sc = await sidecar_factory(
        {"app": {"url": up.url, "timeouts": {"response_header": "200ms", "total": "3s"}}}
    )
    resp = await request(sc.ports["inbound"], get("/"), timeout=2.0)
    assert resp.status == 504
    assert "response header" in error_of(resp)["message"]
