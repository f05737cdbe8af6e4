"""The global-lock routes over real loopback sockets, on both backends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.errors import ERROR_HEADER
from sidecar.txn.locks import LockManager, MemoryLocks, RedisLocks
from sidecar.txn.locks_api import add_lock_routes
from tests.redis_server import redis_server, redis_url  # noqa: F401

A = "10.0.0.1:8091:1"
B = "10.0.0.1:8091:2"


class Api:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(
        self, method: str, path: str, *, json: Any = None, data: bytes | None = None
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        async with self.session.request(method, self.base + path, json=json, data=data) as r:
            return r.status, await r.json(), r


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[LockManager]:
    manager: LockManager
    if request.param == "memory":
        manager = MemoryLocks()
    else:
        manager = RedisLocks.from_url(request.getfixturevalue("redis_url"))
    yield manager
    await manager.close()


@pytest.fixture
async def api(
    backend: LockManager, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> AsyncIterator[Api]:
    app = web.Application(client_max_size=4096)
    add_lock_routes(app, backend)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:
        yield Api(session, f"http://127.0.0.1:{server.port}")


def _error(body: Any, response: aiohttp.ClientResponse, code: str) -> dict[str, Any]:
    assert response.headers[ERROR_HEADER] == code
    assert response.content_type == "application/json"
    err: dict[str, Any] = body["error"]
    assert err["code"] == code and err["message"]
    return err


async def test_acquire_query_release(api: Api) -> None:
    status, body, _ = await api.call(
        "POST", "/v1/locks", json={"xid": A, "keys": ["orders:1", "stock:a/b", "orders:1"]}
    )
    assert (status, body) == (200, {"xid": A, "keys": ["orders:1", "stock:a/b"]})
    status, body, _ = await api.call("GET", "/v1/locks/orders:1")
    assert (status, body) == (200, {"key": "orders:1", "holder": A})
    status, body, _ = await api.call("GET", "/v1/locks/stock:a%2Fb")
    assert (status, body) == (200, {"key": "stock:a/b", "holder": A})
    status, body, _ = await api.call("GET", "/v1/locks/stock:a/b")
    assert (status, body) == (200, {"key": "stock:a/b", "holder": A})
    # re-acquiring what the XID holds is fine
    status, _, _ = await api.call("POST", "/v1/locks", json={"xid": A, "keys": ["orders:1"]})
    assert status == 200
    status, body, _ = await api.call("DELETE", f"/v1/locks/{A}")
    assert (status, body) == (200, {"xid": A, "released": 2})
    status, body, _ = await api.call("GET", "/v1/locks/orders:1")
    assert (status, body) == (200, {"key": "orders:1", "holder": None})


async def test_conflict_names_holder_and_takes_nothing(api: Api) -> None:
    await api.call("POST", "/v1/locks", json={"xid": A, "keys": ["orders:2"]})
    status, body, resp = await api.call(
        "POST", "/v1/locks", json={"xid": B, "keys": ["orders:1", "orders:2"], "timeout": "30s"}
    )
    assert status == 409
    err = _error(body, resp, "LOCK_CONFLICT")
    assert err["holder"] == A and err["key"] == "orders:2"
    assert A in err["message"]
    _, body, _ = await api.call("GET", "/v1/locks/orders:1")
    assert body["holder"] is None


async def test_release_of_nothing(api: Api) -> None:
    status, body, _ = await api.call("DELETE", f"/v1/locks/{B}")
    assert (status, body) == (200, {"xid": B, "released": 0})


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "JSON object"),
        (b"[1, 2]", "JSON object"),
        (b'{"keys": ["orders:1"]}', "xid must be a string"),
        (b'{"xid": 12, "keys": ["orders:1"]}', "xid must be a string"),
        (b'{"xid": "10.0.0.1:8091:1"}', "list"),
        (b'{"xid": "10.0.0.1:8091:1", "keys": []}', "at least one"),
        (b'{"xid": "10.0.0.1:8091:1", "keys": [1]}', "string"),
        (b'{"xid": "10.0.0.1:8091:1", "keys": ["orders"]}', "resource:key"),
        (b'{"xid": "10.0.0.1:8091:1", "keys": ["orders:*"]}', "whole table"),
        (b'{"xid": "10.0.0.1:8091:1", "keys": ["a:1"], "timeout": 30}', "duration"),
        (b'{"xid": "10.0.0.1:8091:1", "keys": ["a:1"], "timeout": "soon"}', "invalid duration"),
        # an unknown field is refused, never ignored
        (b'{"xid": "10.0.0.1:8091:1", "keys": ["a:1"], "ttl": "30s"}', "unknown field(s) 'ttl'"),
    ],
)
async def test_invalid_requests(api: Api, payload: bytes, fragment: str) -> None:
    status, body, resp = await api.call("POST", "/v1/locks", data=payload)
    assert status == 400
    assert fragment in _error(body, resp, "INVALID_REQUEST")["message"]


@pytest.mark.parametrize("xid", ["10.0.0.1:8091:", "10.0.0.1:8091", "host:0:1", "a" * 200 + ":1:1"])
async def test_malformed_xid(api: Api, xid: str) -> None:
    status, body, resp = await api.call("POST", "/v1/locks", json={"xid": xid, "keys": ["a:1"]})
    assert status == 400
    _error(body, resp, "XID_INVALID")
    status, body, resp = await api.call("DELETE", f"/v1/locks/{xid}")
    assert status == 400
    _error(body, resp, "XID_INVALID")


async def test_invalid_key_in_path(api: Api) -> None:
    status, body, resp = await api.call("GET", "/v1/locks/orders")
    assert status == 400
    _error(body, resp, "INVALID_REQUEST")


async def test_body_too_large(api: Api) -> None:
    keys = [f"orders:{i:04d}" for i in range(500)]
    status, body, resp = await api.call("POST", "/v1/locks", json={"xid": A, "keys": keys})
    assert status == 413
    _error(body, resp, "PAYLOAD_TOO_LARGE")
