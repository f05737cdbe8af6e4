"""A request repeated with the same Idempotency-Key on a declared transaction route never runs
the app a second time (a caller retrying after a 503 `Unknown` must not order twice)."""

from __future__ import annotations

import asyncio
from typing import Any

from sidecar.idempotency import IdempotencyStore
from sidecar.txn.repeats import Repeats, fingerprint
from tests.component.servers import (
    Received,
    Reply,
    UpstreamFactory,
    default_handler,
    error_of,
    get,
    request,
)
from tests.component.test_abandon import ORDERS

STATUS = "x-gts-transaction-status"


def order(key: str, path: str = "/orders") -> bytes:
    return get(path, f"Idempotency-Key: {key}", method="POST", body=b'{"sku":"A-1"}')


async def _start(sidecar_factory: Any, upstream: UpstreamFactory, handler: Any) -> Any:
    app = await upstream(handler)
    sc = await sidecar_factory({"app": {"url": app.url}, **ORDERS})
    return sc, app, sc.ports["inbound"]


async def test_a_repeat_of_a_committed_request_is_answered_without_the_app(
    sidecar_factory, upstream
):
    async def created(req: Received, reply: Reply) -> None:
        await reply.send(201, b'{"id":"1"}')

    sc, app, port = await _start(sidecar_factory, upstream, created)
    first = await request(port, order("order-7"))
    assert (first.status, first.get(STATUS)) == (201, "Committed")
    again = await request(port, order("order-7"))
    assert again.status == 409
    assert error_of(again)["code"] == "DUPLICATE_REQUEST"
    assert again.get("XID") == first.get("XID")
    assert again.get(STATUS) == "Committed"
    assert len(app.requests) == 1
    # another key is another request
    other = await request(port, order("order-8"))
    assert other.status == 201 and other.get("XID") != first.get("XID")
    assert len(app.requests) == 2


async def test_a_repeat_of_a_rolled_back_request_is_not_run_again(sidecar_factory, upstream):
    async def fails(req: Received, reply: Reply) -> None:
        await reply.send(500, b"out of stock")

    sc, app, port = await _start(sidecar_factory, upstream, fails)
    first = await request(port, order("order-9"))
    assert (first.status, first.get(STATUS)) == (500, "Rollbacked")
    again = await request(port, order("order-9"))
    assert (again.status, error_of(again)["code"], again.get(STATUS)) == (
        409,
        "DUPLICATE_REQUEST",
        "Rollbacked",
    )
    assert len(app.requests) == 1


async def test_a_repeat_while_the_first_runs_is_told_to_retry_later(sidecar_factory, upstream):
    release = asyncio.Event()

    async def slow(req: Received, reply: Reply) -> None:
        await release.wait()
        await reply.send(201, b"{}")

    sc, app, port = await _start(sidecar_factory, upstream, slow)
    first = asyncio.create_task(request(port, order("order-10")))
    await app.wait_requests(1)
    again = await request(port, order("order-10"))
    assert again.status == 409
    assert error_of(again)["code"] == "REQUEST_IN_PROGRESS"
    assert again.get("Retry-After") == "1"
    assert again.get("XID") == app.requests[0].get("XID")
    release.set()
    assert (await first).get(STATUS) == "Committed"
    done = await request(port, order("order-10"))
    assert (error_of(done)["code"], done.get(STATUS)) == ("DUPLICATE_REQUEST", "Committed")
    assert len(app.requests) == 1


async def test_a_key_reused_for_another_target_is_422(sidecar_factory, upstream):
    sc, app, port = await _start(sidecar_factory, upstream, default_handler)
    assert (await request(port, order("k-1"))).status == 200
    reused = await request(port, order("k-1", "/orders?express=1"))
    assert reused.status == 422
    assert error_of(reused)["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert len(app.requests) == 1


async def test_a_claim_left_by_an_attempt_that_died_before_beginning_is_taken_over() -> None:
    now = [1000.0]
    store = IdempotencyStore.memory()
    repeats = Repeats(store, clock=lambda: now[0])
    fp = fingerprint(b"POST", b"/orders")
    try:
        first, _ = await repeats.claim("k", fp, timeout_ms=30_000)
        assert first
        # within the transaction timeout it may still begin: a repeat waits
        now[0] += 29
        first, earlier = await repeats.claim("k", fp, timeout_ms=30_000)
        assert not first and earlier.xid is None
        # past it, nothing can be running under that claim any more
        now[0] += 2
        first, _ = await repeats.claim("k", fp, timeout_ms=30_000)
        assert first
    finally:
        await store.close()
