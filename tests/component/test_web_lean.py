"""The lean serving path (sidecar/web_lean.py) over a real socket: a lean route in plain form
is answered by the dispatcher itself (the guard sees the route's own handler and parameter),
and everything else reaches the Application, behind the same guard, with the same answers:
percent-escapes, HEAD, Expect, a method the path does not allow, unknown paths, and routes
added to the app by other modules. Also: `find` agrees with aiohttp's router on which route
a plain path names."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from sidecar.web_errors import as_response, json_response
from sidecar.web_lean import LEAN, LeanHandler, LeanRoutes, middleware, setup
from sidecar.web_routing import application


@dataclass
class Seen:
    #: (lean: the guard was handed the route's own handler, param the guard was given)
    guarded: list[tuple[bool, str]] = field(default_factory=list)
    lean: set[LeanHandler] = field(default_factory=set)


def build(seen: Seen) -> web.Application:
    async def guard(
        request: web.BaseRequest, handler: LeanHandler, param: str
    ) -> web.StreamResponse:
        seen.guarded.append((handler in seen.lean, param))
        try:
            return await handler(request, param)
        except Exception as exc:
            return as_response(request, exc)

    async def commit(request: web.BaseRequest, xid: str) -> web.Response:
        return json_response({"xid": xid, "body": (await request.read()).decode()})

    async def health(request: web.BaseRequest, _: str) -> web.Response:
        return json_response({"status": "ok"})

    async def other(request: web.Request) -> web.Response:  # an ordinary aiohttp route
        return json_response({"other": request.match_info["name"]})

    seen.lean |= {commit, health}
    app = application(middlewares=[middleware(guard)], client_max_size=1024)
    routes = app[LEAN] = LeanRoutes(guard)
    routes.add(app, "GET", "/healthz", health)
    routes.add(app, "POST", "/v1/tx/{xid}/commit", commit)
    app.router.add_post("/v1/other/{name}", other)
    return app


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, Seen]]:
    seen = Seen()
    runner = await setup(build(seen))
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", seen
    await runner.cleanup()


async def call(
    base: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, bytes, str | None]:
    async with aiohttp.ClientSession() as session:
        async with session.request(
            method,
            URL(base + path, encoded=True),  # sent as written: no escape undone
            data=body,
            headers=headers,
            skip_auto_headers=["Content-Type"],
        ) as r:
            return r.status, await r.read(), r.headers.get("x-gts-sidecar-error")


async def test_a_plain_request_for_a_lean_route_is_answered_by_the_dispatcher(served) -> None:
    base, seen = served
    assert await call(base, "POST", "/v1/tx/a:1:2/commit", b"hi") == (
        200,
        b'{"xid":"a:1:2","body":"hi"}',
        None,
    )
    assert seen.guarded == [(True, "a:1:2")]


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "body"),
    [
        # aiohttp decodes the escape: the same answer, from the Application
        ("POST", "/v1/tx/a%3A1:2/commit", {}, 200, b'{"xid":"a:1:2","body":"hi"}'),
        ("POST", "/v1/tx/a:1:2/commit?x=1", {}, 200, b'{"xid":"a:1:2","body":"hi"}'),
        ("POST", "/v1/tx/a:1:2/commit", {"Expect": "100-continue"}, 200, None),
        ("HEAD", "/healthz", {}, 200, b""),
        ("POST", "/v1/other/x", {}, 200, b'{"other":"x"}'),
    ],
)
async def test_anything_else_reaches_the_application_behind_the_same_guard(
    served, method, path, headers, status, body
) -> None:
    base, seen = served
    got_status, got_body, _ = await call(base, method, path, b"hi", headers)
    assert got_status == status
    if body is not None:
        assert got_body == body
    assert seen.guarded == [(False, "")]  # the guard ran, as the app's middleware


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/tx/a:1:2/commit", 405, "METHOD_NOT_ALLOWED"),
        ("POST", "/healthz", 405, "METHOD_NOT_ALLOWED"),
        ("POST", "/v1/tx//commit", 404, "NOT_FOUND"),
        ("POST", "/v1/tx/a/b/commit", 404, "NOT_FOUND"),
        ("GET", "/nowhere", 404, "NOT_FOUND"),
    ],
)
async def test_refusals_are_the_applications_in_the_error_shape(
    served, method, path, status, code
) -> None:
    base, seen = served
    got_status, _, error = await call(base, method, path)
    assert (got_status, error) == (status, code)
    assert all(not lean for lean, _ in seen.guarded)


PARAM = st.one_of(
    st.sampled_from(["a:1:2", "ab", "x-y", ""]), st.text(alphabet="ab:%{}./?-", max_size=6)
)
HITS: list[str] = []


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.sampled_from(["/v1/tx/", "/v1/tx/", "/v1/tx", "/healthz", "/v1/", "//v1/tx/"]),
    PARAM,
    st.sampled_from(["/commit", "/commit", "", "/commit/", "/x", "commit"]),
    st.sampled_from(["POST", "POST", "GET", "HEAD"]),
)
async def test_find_names_the_route_aiohttps_router_would(
    prefix: str, param_text: str, suffix: str, method: str
) -> None:
    from aiohttp.test_utils import make_mocked_request

    seen = Seen()
    app = build(seen)
    routes = app[LEAN]
    raw = prefix + param_text + suffix
    found = routes.find(method, raw)
    if found is None:
        return  # aiohttp's to answer, whatever it says
    handler, param = found
    HITS.append(raw)
    try:
        request = make_mocked_request(method, raw, app=app)
    except ValueError:
        pytest.fail(f"find took {raw!r}, which is not a request target")
    match = await app.router.resolve(request)
    assert match.http_exception is None, raw
    assert match.get("xid", "") == param


def test_find_was_exercised_on_lean_routes() -> None:
    # (runs after the property above, in file order)
    assert len(HITS) >= 5, HITS
