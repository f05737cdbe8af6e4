"""The app-facing transaction-manager API (`api` listener) and declarative transactions on the
inbound listener, with the sidecar's own (local) coordinator, over real loopback sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest

from sidecar.coordinator.states import BranchStatus, BranchType, GlobalStatus
from tests.component.gts import BranchServer, Reply
from tests.component.servers import (
    Received,
    UpstreamFactory,
    closed_port,
    error_of,
    get,
    request,
)
from tests.component.servers import Reply as AppReply

ORDERS_RULE = {
    "transactions": [
        {"match": {"method": "POST", "path": "/orders"}, "name": "create-order", "timeout": "30s"}
    ]
}
STATUS_HEADER = "x-gts-transaction-status"


def declared(sc: Any, status: str, name: str = "create-order") -> float:
    """gts_sidecar_declarative_transactions_total{name, status}"""
    value = sc.metrics.registry.get_sample_value(
        "gts_sidecar_declarative_transactions_total", {"name": name, "status": status}
    )
    return 0.0 if value is None else value


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamFactory]:
    factory = UpstreamFactory()
    yield factory
    await factory.close()


@pytest.fixture
async def branches() -> AsyncIterator[BranchServer]:
    server = await BranchServer().start()
    yield server
    await server.close()


class Api:
    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}"

    async def call(
        self,
        method: str,
        path: str,
        body: bytes | dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        data = orjson.dumps(body) if isinstance(body, dict) else body
        async with self.session.request(
            method, self.base + path, data=data, headers=headers or {}
        ) as resp:
            return Reply(resp.status, resp.headers, await resp.read())

    async def begin(self, name: str = "create-order", timeout: str | None = "30s") -> str:
        body: dict[str, Any] = {"name": name}
        if timeout is not None:
            body["timeout"] = timeout
        reply = await self.call("POST", "/v1/transactions", body)
        assert reply.status == 200, reply.raw
        xid: str = reply.json()["xid"]
        return xid


@pytest.fixture
async def api(sidecar_factory, session):
    sc = await sidecar_factory()
    return sc, Api(session, sc.ports["api"])


# --- the TM API ---------------------------------------------------------------------------------


async def test_begin_then_commit(api):
    sc, client = api
    reply = await client.call(
        "POST", "/v1/transactions", {"name": "create-order", "timeout": "30s"}
    )
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.json()
    xid = body["xid"]
    assert body == {"xid": xid, "status": "Begin"}
    assert xid.startswith(f"127.0.0.1:{sc.ports['peer']}:")
    record, _ = await sc.control.engine.get(xid)
    assert (record.name, record.timeout_ms, record.status) == (
        "create-order",
        30_000,
        GlobalStatus.BEGIN,
    )
    reply = await client.call("POST", f"/v1/transactions/{xid}/commit")
    assert (reply.status, reply.json()) == (200, {"xid": xid, "status": "Committed"})
    # again: the same answer
    reply = await client.call("POST", f"/v1/transactions/{xid}/commit")
    assert (reply.status, reply.json()) == (200, {"xid": xid, "status": "Committed"})


async def test_begin_then_rollback(api):
    sc, client = api
    xid = await client.begin()
    reply = await client.call("POST", f"/v1/transactions/{xid}/rollback")
    assert (reply.status, reply.json()) == (200, {"xid": xid, "status": "Rollbacked"})
    reply = await client.call("POST", f"/v1/transactions/{xid}/commit")
    assert reply.json()["status"] == "Rollbacked"


async def test_begin_without_timeout_uses_the_default(api):
    sc, client = api
    xid = await client.begin(timeout=None)
    assert (await sc.control.engine.get(xid))[0].timeout_ms == 60_000


async def test_status_shows_the_branches(api, branches):
    sc, client = api
    xid = await client.begin()
    engine = sc.control.engine
    b = await engine.register(xid, BranchType.TCC, "stock", branches.url("stock"), b'{"n":1}')
    await engine.report(xid, b.branch_id, BranchStatus.PHASE_ONE_DONE)
    for path in (f"/v1/transactions/{xid}", f"/v1/transactions/{quote(xid, safe='')}"):
        reply = await client.call("GET", path)
        assert reply.status == 200
        got = reply.json()
        assert (got["xid"], got["status"], got["name"], got["timeoutMs"]) == (
            xid,
            "Begin",
            "create-order",
            30_000,
        )
        assert [(x["branchId"], x["resourceId"], x["status"]) for x in got["branches"]] == [
            (str(b.branch_id), "stock", "PhaseOne_Done")
        ]
    reply = await client.call("POST", f"/v1/transactions/{xid}/commit")
    assert reply.json()["status"] == "Committed"
    assert branches.phases() == [("stock", "commit")]
    got = (await client.call("GET", f"/v1/transactions/{xid}")).json()
    assert got["status"] == "Committed"
    assert got["branches"][0]["status"] == "PhaseTwo_Committed"


async def test_idempotency_key_on_begin(api):
    sc, client = api
    body = {"name": "create-order", "timeout": "30s"}
    key = {"Idempotency-Key": "begin-42"}
    first = await client.call("POST", "/v1/transactions", body, key)
    again = await client.call("POST", "/v1/transactions", body, key)
    assert first.status == again.status == 200
    assert again.json()["xid"] == first.json()["xid"]
    assert sc.control.engine.active == 1
    other = await client.call("POST", "/v1/transactions", {**body, "timeout": "20s"}, key)
    assert other.status == 422
    assert other.error["code"] == "IDEMPOTENCY_KEY_REUSED"
    fresh = await client.call("POST", "/v1/transactions", body, {"Idempotency-Key": "begin-43"})
    assert fresh.json()["xid"] != first.json()["xid"]
    assert sc.control.engine.active == 2


BAD_BEGINS = [
    ("not-json", b"{name: x}", "JSON"),
    ("empty", b"", "JSON object"),
    ("array", b'["create-order"]', "JSON object"),
    ("no-name", {"timeout": "30s"}, "name"),
    ("name-int", {"name": 7}, "name"),
    ("name-empty", {"name": ""}, "name"),
    ("name-long", {"name": "n" * 129}, "name"),
    ("timeout-soon", {"name": "x", "timeout": "soon"}, "timeout"),
    ("timeout-bare-number", {"name": "x", "timeout": 30}, "timeout"),
    ("timeout-zero", {"name": "x", "timeout": "0s"}, "timeout"),
    ("timeout-over-max", {"name": "x", "timeout": "48h"}, "timeout"),
]


@pytest.mark.parametrize(
    ("body", "words"), [b[1:] for b in BAD_BEGINS], ids=[b[0] for b in BAD_BEGINS]
)
async def test_a_bad_begin_is_400_invalid_request(api, body, words):
    sc, client = api
    reply = await client.call("POST", "/v1/transactions", body)
    assert reply.status == 400, reply.raw
    err = reply.error
    assert err["code"] == "INVALID_REQUEST"
    assert words in err["message"]
    assert sc.control.engine.active == 0


async def test_an_oversized_begin_is_413(api):
    sc, client = api
    reply = await client.call("POST", "/v1/transactions", {"name": "x", "pad": "p" * 70_000})
    assert reply.status == 413
    assert reply.error["code"] == "PAYLOAD_TOO_LARGE"
    assert sc.control.engine.active == 0


@pytest.mark.parametrize(
    ("method", "suffix"), [("GET", ""), ("POST", "/commit"), ("POST", "/rollback")]
)
async def test_unknown_and_malformed_xids(api, method, suffix):
    sc, client = api
    unknown = f"127.0.0.1:{sc.ports['peer']}:987654321"
    reply = await client.call(method, f"/v1/transactions/{unknown}{suffix}")
    assert reply.status == 404
    assert reply.error["code"] == "TRANSACTION_NOT_FOUND"
    for bad in (
        "not-an-xid",
        "10.0.0.1:8091:",
        "10.0.0.1:0:5",
        quote("10.0.0.1:80:1\x01", safe=""),
    ):
        reply = await client.call(method, f"/v1/transactions/{bad}{suffix}")
        assert reply.status == 400, (bad, reply.raw)
        assert reply.error["code"] == "XID_INVALID"


@pytest.mark.parametrize(("max_length", "status"), [(None, 400), (200, 404)])
async def test_the_tm_api_holds_xids_to_xid_max_length(
    sidecar_factory, session, max_length: int | None, status: int
):
    # a 136-byte XID (a long coordinator host name): over the default 128, under 200
    long_xid = f"{'a' * 60}.{'b' * 60}.example:8091:1"
    sc = await sidecar_factory({"xid": {"max_length": max_length}} if max_length else {})
    reply = await Api(session, sc.ports["api"]).call("GET", f"/v1/transactions/{long_xid}")
    assert reply.status == status, reply.raw
    code = "XID_INVALID" if status == 400 else "TRANSACTION_NOT_FOUND"
    assert reply.error["code"] == code


# --- declarative transactions on the inbound listener -------------------------------------------


async def _inbound(sidecar_factory, upstream, handler, **over: Any):
    app = await upstream(handler)
    sc = await sidecar_factory({"app": {"url": app.url}, **ORDERS_RULE, **over})
    return sc, app, sc.ports["inbound"]


def _answer(status: int, body: bytes = b'{"id":1}'):
    async def handler(req: Received, reply: AppReply) -> None:
        await reply.send(status, body, [("Content-Type", "application/json")])

    return handler


async def test_a_matching_request_that_succeeds_commits(sidecar_factory, upstream):
    sc, app, port = await _inbound(sidecar_factory, upstream, _answer(201))
    resp = await request(port, get("/orders", method="POST", body=b'{"sku":"A-1"}'))
    assert resp.status == 201
    assert resp.body == b'{"id":1}'
    xid = resp.get("XID")
    assert xid and xid.startswith(f"127.0.0.1:{sc.ports['peer']}:")
    assert resp.get(STATUS_HEADER) == "Committed"
    (seen,) = app.requests
    assert seen.get_all("XID") == [xid]
    record, _ = await sc.control.engine.get(xid)
    assert (record.name, record.timeout_ms, record.status) == (
        "create-order",
        30_000,
        GlobalStatus.COMMITTED,
    )
    assert declared(sc, "Committed") == 1


async def test_a_matching_request_that_fails_rolls_back(sidecar_factory, upstream):
    sc, app, port = await _inbound(sidecar_factory, upstream, _answer(500, b"boom"))
    resp = await request(port, get("/orders", method="POST", body=b"{}"))
    # the app's own answer stands; the transaction is rolled back
    assert resp.status == 500
    assert resp.body == b"boom"
    assert resp.get("x-gts-sidecar-error") is None
    xid = resp.get("XID")
    assert resp.get(STATUS_HEADER) == "Rollbacked"
    assert app.requests[0].get("XID") == xid
    assert (await sc.control.engine.get(xid))[0].status is GlobalStatus.ROLLBACKED


async def test_an_unreachable_app_is_502_and_rolls_back(sidecar_factory):
    port = closed_port()
    sc = await sidecar_factory({"app": {"url": f"http://127.0.0.1:{port}"}, **ORDERS_RULE})
    resp = await request(sc.ports["inbound"], get("/orders", method="POST", body=b"{}"))
    assert resp.status == 502
    assert error_of(resp)["code"] == "UPSTREAM_UNAVAILABLE"
    assert resp.get(STATUS_HEADER) == "Rollbacked"
    xid = resp.get("XID")
    assert xid
    assert (await sc.control.engine.get(xid))[0].status is GlobalStatus.ROLLBACKED
    assert sc.control.engine.active == 0


async def test_a_request_that_carries_an_xid_joins_it(sidecar_factory, upstream):
    sc, app, port = await _inbound(sidecar_factory, upstream, _answer(201))
    theirs = "10.0.0.7:8091:4242"
    resp = await request(port, get("/orders", f"XID: {theirs}", method="POST", body=b"{}"))
    assert resp.status == 201
    assert resp.get(STATUS_HEADER) is None
    assert resp.get("XID") is None
    assert app.requests[0].get_all("XID") == [theirs]
    assert sc.control.engine.active == 0
    assert await sc.control.journal.unfinished() == []


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/orders"), ("POST", "/orders/1"), ("POST", "/order"), ("PUT", "/orders")],
)
async def test_a_request_no_rule_matches_begins_nothing(sidecar_factory, upstream, method, path):
    sc, app, port = await _inbound(sidecar_factory, upstream, _answer(200))
    resp = await request(port, get(path, method=method, body=b"{}"))
    assert resp.status == 200
    assert resp.get(STATUS_HEADER) is None
    assert resp.get("XID") is None
    assert app.requests[0].get("XID") is None
    assert sc.control.engine.active == 0
    assert declared(sc, "Committed") == 0


async def test_a_rule_matches_with_a_query_string(sidecar_factory, upstream):
    sc, app, port = await _inbound(sidecar_factory, upstream, _answer(200))
    resp = await request(port, get("/orders?source=web", method="POST", body=b"{}"))
    assert resp.get(STATUS_HEADER) == "Committed"
    assert app.requests[0].target == "/orders?source=web"


async def test_a_failed_branch_turns_the_apps_success_into_409(sidecar_factory, upstream, branches):
    holder: dict[str, Any] = {}

    async def app_handler(req: Received, reply: AppReply) -> None:
        # the app's work registered a branch whose try failed
        engine = holder["sc"].control.engine
        xid = req.get("XID")
        branch = await engine.register(xid, BranchType.TCC, "stock", branches.url("stock"), b"{}")
        await engine.report(xid, branch.branch_id, BranchStatus.PHASE_ONE_FAILED)
        holder["xid"] = xid
        await reply.send(201, b'{"id":1}', [("Content-Type", "application/json")])

    sc, app, port = await _inbound(sidecar_factory, upstream, app_handler)
    holder["sc"] = sc
    resp = await request(port, get("/orders", method="POST", body=b"{}"))
    assert resp.status == 409
    err = error_of(resp)
    assert err["code"] == "TRANSACTION_ABORTED"
    assert holder["xid"] in err["message"]
    assert resp.get("XID") == holder["xid"]
    assert resp.get(STATUS_HEADER) == "Rollbacked"
    assert b'{"id":1}' not in resp.body
    assert branches.phases() == [("stock", "rollback")]
    assert (await sc.control.engine.get(holder["xid"]))[0].status is GlobalStatus.ROLLBACKED
    assert declared(sc, "Rollbacked") == 1


async def test_global_locks_are_released_when_the_transaction_ends(sidecar_factory) -> None:
    sc = await sidecar_factory({})
    api = f"http://127.0.0.1:{sc.ports['api']}"
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{api}/v1/transactions", json={"name": "a"}) as r:
            first = (await r.json())["xid"]
        async with s.post(f"{api}/v1/transactions", json={"name": "b"}) as r:
            second = (await r.json())["xid"]
        async with s.post(f"{api}/v1/locks", json={"xid": first, "keys": ["stock:sku-1"]}) as r:
            assert r.status == 200
        async with s.post(f"{api}/v1/locks", json={"xid": second, "keys": ["stock:sku-1"]}) as r:
            assert r.status == 409
            assert (await r.json())["error"]["holder"] == first
        async with s.post(f"{api}/v1/transactions/{first}/commit") as r:
            assert (await r.json())["status"] == "Committed"

        async def released() -> None:
            while True:
                async with s.get(f"{api}/v1/locks/stock:sku-1") as r:
                    if (await r.json())["holder"] is None:
                        return
                await asyncio.sleep(0.01)

        await asyncio.wait_for(released(), 10)
        async with s.post(f"{api}/v1/locks", json={"xid": second, "keys": ["stock:sku-1"]}) as r:
            assert r.status == 200
