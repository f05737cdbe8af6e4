"""FastDispatcher answers exactly as aiohttp's UrlDispatcher does, and answers the common
paths itself (aiohttp's resolve is the fallback for everything unusual)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sidecar.web_routing import FastDispatcher, application

XID = "10.0.0.1:8091:1234"


async def handler(request: web.Request) -> web.Response:
    return web.Response()


def routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/healthz", handler)
    r.add_post("/v1/transactions", handler)
    r.add_post("/v1/transactions/{xid}/commit", handler)
    r.add_post("/v1/transactions/{xid}/rollback", handler)
    r.add_get("/v1/transactions/{xid}", handler)
    r.add_post("/v1/locks", handler)
    r.add_get("/v1/locks/{key:.+}", handler)
    r.add_post("/api/v1/branch/register", handler)
    r.add_post("/v1/a/{x}/b/{y}", handler)
    r.add_get(r"/v1/n/{id:\d+}", handler)


def apps() -> tuple[web.Application, web.Application]:
    plain, fast = web.Application(), application()
    routes(plain)
    routes(fast)
    return plain, fast


async def answer(app: web.Application, method: str, path: str) -> Any:
    info = await app.router.resolve(make_mocked_request(method, path, app=app))
    if info.http_exception is not None:
        return ("error", info.http_exception.status)
    return (info.route.resource.canonical if info.route.resource else None, dict(info))


PATHS = [
    ("GET", "/healthz"),
    ("POST", "/healthz"),
    ("POST", "/v1/transactions"),
    ("GET", "/v1/transactions"),
    ("POST", f"/v1/transactions/{XID}/commit"),
    ("POST", f"/v1/transactions/{XID}/rollback"),
    ("GET", f"/v1/transactions/{XID}/commit"),
    ("GET", f"/v1/transactions/{XID}"),
    ("DELETE", f"/v1/transactions/{XID}"),
    ("POST", "/v1/transactions/10.0.0.1%3A8091%3A1234/commit"),
    ("POST", "/v1/transactions//commit"),
    ("POST", "/v1/transactions/a/b/commit"),
    ("POST", "/v1/transactions/../commit"),
    ("POST", "/v1/transactions/./x/commit"),
    ("POST", f"/v1/transactions/{XID}/commit?x=1"),
    ("GET", "/v1/locks/orders:1"),
    ("GET", "/v1/locks/a/b"),
    ("POST", "/api/v1/branch/register"),
    ("POST", "/api/v1/branch/register/"),
    ("POST", "/v1/a/1/b/2"),
    ("POST", "/v1/a/1/b/"),
    ("GET", "/v1/n/12"),
    ("GET", "/v1/n/ab"),
    ("GET", "/nowhere"),
    ("GET", "/"),
]


@pytest.mark.parametrize(("method", "path"), PATHS)
async def test_answers_as_aiohttp_does(method: str, path: str) -> None:
    plain, fast = apps()
    assert await answer(fast, method, path) == await answer(plain, method, path)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["GET", "POST", "PUT"]),
    st.lists(
        st.sampled_from(["v1", "transactions", "commit", "locks", XID, "", "a", "b", "%41", ".."]),
        max_size=5,
    ),
)
async def test_answers_as_aiohttp_does_for_any_path(method: str, parts: list[str]) -> None:
    plain, fast = apps()
    path = "/" + "/".join(parts)
    assume(not path.startswith("//"))  # an authority, not a path, to the mocked request
    assert await answer(fast, method, path) == await answer(plain, method, path)


async def test_the_common_paths_never_reach_aiohttps_resolve(monkeypatch) -> None:
    _, fast = apps()
    fallbacks: list[str] = []
    original = web.UrlDispatcher.resolve

    async def counting(self: Any, request: web.Request) -> Any:
        fallbacks.append(request.path)
        return await original(self, request)

    monkeypatch.setattr(web.UrlDispatcher, "resolve", counting)
    assert isinstance(fast.router, FastDispatcher)
    for method, path in [
        ("POST", "/v1/transactions"),
        ("POST", f"/v1/transactions/{XID}/commit"),
        ("GET", f"/v1/transactions/{XID}"),
        ("POST", "/api/v1/branch/register"),
    ]:
        assert (await answer(fast, method, path))[0] is not None
    assert fallbacks == []
    await answer(fast, "GET", "/v1/locks/orders:1")  # a regex parameter: aiohttp's
    assert fallbacks == ["/v1/locks/orders:1"]
