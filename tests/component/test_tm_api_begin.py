"""A TM-API begin says what is wrong with what the caller sent, and never outlives its calls.

Over real loopback sockets: a field the TM API does not take (the coordinator protocol's
`timeoutMs`) is refused rather than ignored; a timeout out of range is reported about
`timeout`, the field the caller sent; a timeout that a coordinator call could outlive
(`coordinator.timeouts.request`) is refused naming both values. Nothing is begun by a refusal.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.component.gts import Reply


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def begin(session: aiohttp.ClientSession, sc: Any, body: dict[str, Any]) -> Reply:
    url = f"http://127.0.0.1:{sc.ports['api']}/v1/transactions"
    async with session.post(url, data=orjson.dumps(body)) as resp:
        return Reply(resp.status, resp.headers, await resp.read())


def begun(sc: Any) -> int:
    return int(sc.control.engine.active)


async def test_timeout_ms_is_refused_not_ignored(sidecar_factory, session):
    sc = await sidecar_factory()
    reply = await begin(session, sc, {"name": "order", "timeoutMs": 5000})
    assert reply.status == 400, reply.raw
    err = reply.error
    assert err["code"] == "INVALID_REQUEST"
    # names what was sent and what to send instead
    assert "'timeoutMs'" in err["message"] and '"timeout"' in err["message"], err
    assert begun(sc) == 0
    # next to a valid timeout too: the caller meant something by it
    reply = await begin(session, sc, {"name": "order", "timeout": "30s", "timeoutMs": 5000})
    assert (reply.status, reply.error["code"]) == (400, "INVALID_REQUEST")
    assert begun(sc) == 0


async def test_any_unknown_field_is_named(sidecar_factory, session):
    sc = await sidecar_factory()
    reply = await begin(session, sc, {"name": "order", "timout": "30s"})
    assert reply.status == 400, reply.raw
    assert "'timout'" in reply.error["message"]
    assert begun(sc) == 0


async def test_a_timeout_over_the_maximum_is_reported_about_timeout(sidecar_factory, session):
    sc = await sidecar_factory()
    reply = await begin(session, sc, {"name": "order", "timeout": "25h"})
    assert reply.status == 400, reply.raw
    message = reply.error["message"]
    assert "timeout '25h'" in message and "local_coordinator.max_timeout" in message, message
    assert "timeoutMs" not in message
    assert begun(sc) == 0
    assert (await begin(session, sc, {"name": "order", "timeout": "24h"})).status == 200


async def test_a_clusters_own_limit_is_reported_about_timeout(sidecar_factory, session):
    # a cluster with a lower maximum than ours refuses with its protocol's field name: the app
    # hears about the field it sent
    async def refuse(request: web.Request) -> web.Response:
        body = {"error": {"code": "INVALID_REQUEST", "message": "timeoutMs must be between 1 "
                          "and 3600000 (got 7200000)"}}  # fmt: skip
        return web.json_response(body, status=400, headers={"x-gts-sidecar-error": "X"})

    app = web.Application()
    app.router.add_post("/api/v1/transaction/start", refuse)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        port = runner.addresses[0][1]
        sc = await sidecar_factory({"coordinator": {"endpoints": [f"http://127.0.0.1:{port}"]}})
        reply = await begin(session, sc, {"name": "order", "timeout": "2h"})
        assert reply.status == 400, reply.raw
        message = reply.error["message"]
        assert message.startswith("timeout '2h' is refused by the coordinator"), message
        assert "timeoutMs" not in message
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("request_timeout", "timeout", "accepted"),
    [
        ("3s", "1s", False),  # the default call timeout outlives a 1 s transaction
        ("3s", "3s", False),  # equal: the call may end with the transaction, not before it
        ("3s", "3500ms", True),
        ("500ms", "1s", True),
    ],
)
async def test_a_timeout_a_coordinator_call_could_outlive_is_refused(
    sidecar_factory, session, request_timeout, timeout, accepted
):
    sc = await sidecar_factory({"coordinator": {"timeouts": {"request": request_timeout}}})
    reply = await begin(session, sc, {"name": "order", "timeout": timeout})
    if accepted:
        assert reply.status == 200, reply.raw
        assert begun(sc) == 1
        return
    assert reply.status == 400, reply.raw
    err = reply.error
    assert err["code"] == "INVALID_REQUEST"
    # both values, and the key to change
    assert f"timeout '{timeout}'" in err["message"], err
    assert f"coordinator.timeouts.request ({request_timeout})" in err["message"], err
    assert begun(sc) == 0
