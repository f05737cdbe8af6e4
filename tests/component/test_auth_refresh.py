"""TokenSource against a real token endpoint on loopback (sidecar/coordinator/auth.py).

The endpoint counts requests, so the tests can assert how many fetches each scenario made:
one for many concurrent callers, one per refresh, one per 401 however many callers got it.
Time is an injected clock shared by the endpoint (iat/exp) and the client (refresh).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.coordinator.auth import TokenSource, verify_bearer
from sidecar.errors import CoordinatorUnavailable, Unauthorized

KEY = "token-endpoint-hmac-key-" + "0123456789abcdef" * 4
ACCESS_KEY = "ak-test-0001"
AUD = "gts-coordinator"
T0 = 1_700_000_000.0


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class TokenEndpoint:
    """What the endpoint answers; tests change the fields between calls."""

    clock: Callable[[], float]
    lifetime: int = 100
    delay: float = 0.0
    status: int = 200
    alg: str = "HS256"
    aud: str = AUD
    with_iat: bool = True
    with_exp: bool = True
    expires_in: int | None = None
    raw_body: bytes | None = None
    requests: int = 0
    bodies: list[Any] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.bodies.append(await request.json())
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.raw_body is not None:
            return web.Response(body=self.raw_body, content_type="application/json")
        if self.status != 200:
            return web.json_response({"error": "nope"}, status=self.status)
        now = int(self.clock())
        claims: dict[str, Any] = {"sub": "sidecar-a", "aud": self.aud, "jti": str(self.requests)}
        if self.with_iat:
            claims["iat"] = now
        if self.with_exp:
            claims["exp"] = now + self.lifetime
        if self.alg == "none":
            token = jwt.encode(claims, None, algorithm="none")
        else:
            token = jwt.encode(claims, KEY, algorithm=self.alg)
        body: dict[str, Any] = {"access_token": token}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return web.json_response(body)


@dataclass
class Env:
    endpoint: TokenEndpoint
    clock: Clock
    url: str
    make: Callable[..., TokenSource]


@pytest.fixture
async def env(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> AsyncIterator[Env]:
    clock = Clock()
    endpoint = TokenEndpoint(clock)
    app = web.Application()
    app.router.add_post("/oauth/token", endpoint.handle)
    server = await aiohttp_server(app)
    url = str(server.make_url("/oauth/token"))
    sources: list[TokenSource] = []

    def make(**kw: Any) -> TokenSource:
        kw.setdefault("audience", AUD)
        kw.setdefault("clock", clock)
        src = TokenSource(aiohttp.ClientSession, kw.pop("url", url), ACCESS_KEY, **kw)
        sources.append(src)
        return src

    yield Env(endpoint, clock, url, make)
    for src in sources:
        await src.close()


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


async def test_fetches_on_demand_with_the_documented_shape(env: Env) -> None:
    src = env.make()
    assert env.endpoint.requests == 0
    token = await src.token()
    assert env.endpoint.requests == 1
    assert env.endpoint.bodies == [{"accessKey": ACCESS_KEY}]
    assert claims_of(token)["aud"] == AUD
    assert await src.token() == token
    assert env.endpoint.requests == 1


async def test_fifty_concurrent_callers_one_fetch(env: Env) -> None:
    env.endpoint.delay = 0.05
    src = env.make()
    tokens = await asyncio.gather(*(src.token() for _ in range(50)))
    assert env.endpoint.requests == 1 and src.fetches == 1
    assert len(set(tokens)) == 1


async def test_refresh_at_80_percent_of_iat_to_exp(env: Env) -> None:
    src = env.make()
    first = await src.token()
    env.clock.t += 79.9
    assert await src.token() == first
    assert env.endpoint.requests == 1
    env.clock.t += 0.1  # 80 s of a 100 s lifetime
    second = await src.token()
    assert second != first and env.endpoint.requests == 2
    assert claims_of(second)["iat"] == int(T0 + 80)


async def test_refresh_during_load_is_one_fetch(env: Env) -> None:
    src = env.make()
    await src.token()
    env.clock.t += 85
    env.endpoint.delay = 0.05
    tokens = await asyncio.gather(*(src.token() for _ in range(50)))
    assert env.endpoint.requests == 2 and len(set(tokens)) == 1


async def test_refresh_by_expires_in_when_the_token_has_no_iat(env: Env) -> None:
    env.endpoint.with_iat = False
    env.endpoint.with_exp = False
    env.endpoint.expires_in = 10
    src = env.make()
    first = await src.token()
    env.clock.t += 7.9
    assert await src.token() == first
    env.clock.t += 0.1
    assert await src.token() != first
    assert env.endpoint.requests == 2


async def test_invalidate_refetches_once_for_many_callers(env: Env) -> None:
    src = env.make()
    old = await src.token()
    env.endpoint.delay = 0.05
    fresh = await asyncio.gather(*(src.invalidate(old) for _ in range(30)))
    assert env.endpoint.requests == 2
    assert len(set(fresh)) == 1 and fresh[0] != old
    # a late 401 for the token already replaced fetches nothing
    assert await src.invalidate(old) == fresh[0]
    assert env.endpoint.requests == 2
    # a 401 for the current token does
    newest = await src.invalidate(fresh[0])
    assert newest != fresh[0] and env.endpoint.requests == 3


async def test_token_endpoint_down_is_coordinator_unavailable(env: Env) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = env.make(url=f"http://127.0.0.1:{port}/oauth/token")
    with pytest.raises(CoordinatorUnavailable) as info:
        await src.token()
    assert "unreachable" in info.value.message


async def test_failure_is_shared_by_concurrent_callers(env: Env) -> None:
    env.endpoint.status = 503
    env.endpoint.delay = 0.05
    src = env.make()
    results = await asyncio.gather(*(src.token() for _ in range(20)), return_exceptions=True)
    assert all(isinstance(r, CoordinatorUnavailable) for r in results)
    assert env.endpoint.requests == 1
    env.endpoint.status = 200  # the next call tries again
    await src.token()
    assert env.endpoint.requests == 2


@pytest.mark.parametrize("status", [401, 403])
async def test_access_key_refused_is_unauthorized(env: Env, status: int) -> None:
    env.endpoint.status = status
    with pytest.raises(Unauthorized) as info:
        await env.make().token()
    assert f"HTTP {status}" in info.value.message and ACCESS_KEY not in info.value.message


@pytest.mark.parametrize("status", [500, 502, 404, 429])
async def test_other_statuses_are_coordinator_unavailable(env: Env, status: int) -> None:
    env.endpoint.status = status
    with pytest.raises(CoordinatorUnavailable):
        await env.make().token()


async def test_endpoint_timeout_is_coordinator_unavailable(env: Env) -> None:
    env.endpoint.delay = 2.0
    with pytest.raises(CoordinatorUnavailable):
        await env.make(timeout=0.2).token()


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"token": "x"}', b'{"access_token": 5}'])
async def test_bad_answer_is_coordinator_unavailable(env: Env, body: bytes) -> None:
    env.endpoint.raw_body = body
    with pytest.raises(CoordinatorUnavailable):
        await env.make().token()


async def test_non_jwt_token_is_unauthorized(env: Env) -> None:
    env.endpoint.raw_body = b'{"access_token": "opaque", "expires_in": 60}'
    with pytest.raises(Unauthorized):
        await env.make().token()


@pytest.mark.parametrize("alg", ["none", "HS512"])
async def test_token_with_disallowed_alg_is_unauthorized(env: Env, alg: str) -> None:
    env.endpoint.alg = alg
    with pytest.raises(Unauthorized) as info:
        await env.make(algorithms=["HS256"]).token()
    assert "algorithm" in info.value.message


async def test_token_for_another_audience_is_unauthorized(env: Env) -> None:
    env.endpoint.aud = "someone-else"
    with pytest.raises(Unauthorized):
        await env.make().token()


async def test_token_without_expiry_or_already_expired_is_unauthorized(env: Env) -> None:
    env.endpoint.with_exp = False
    with pytest.raises(Unauthorized):
        await env.make().token()
    env.endpoint.with_exp = True
    env.endpoint.lifetime = -10
    with pytest.raises(Unauthorized) as info:
        await env.make().token()
    assert "expired" in info.value.message


async def test_old_token_served_while_the_endpoint_is_down(env: Env) -> None:
    src = env.make(retry_after=1.0)
    first = await src.token()
    env.clock.t += 85
    env.endpoint.status = 503
    assert await src.token() == first  # still valid: keep going
    assert await src.token() == first  # and no new attempt before retry_after
    assert env.endpoint.requests == 2
    env.clock.t += 1
    assert await src.token() == first
    assert env.endpoint.requests == 3
    env.endpoint.status = 200
    env.clock.t += 1
    assert await src.token() != first
    # once the old token has expired, the failure surfaces
    env.clock.t += 85
    env.endpoint.status = 503
    await src.token()  # at 85 %: still served
    env.clock.t += 20
    with pytest.raises(CoordinatorUnavailable):
        await src.token()


async def test_refused_token_is_never_reused_when_the_endpoint_is_down(env: Env) -> None:
    src = env.make()
    first = await src.token()
    env.endpoint.status = 503
    with pytest.raises(CoordinatorUnavailable):
        await src.invalidate(first)


async def test_a_cancelled_caller_does_not_cancel_the_shared_fetch(env: Env) -> None:
    env.endpoint.delay = 0.1
    src = env.make()
    impatient = asyncio.ensure_future(src.token())
    patient = asyncio.ensure_future(src.token())
    await asyncio.sleep(0.02)
    impatient.cancel()
    token = await patient
    assert impatient.cancelled() and claims_of(token)["jti"] == "1"
    assert env.endpoint.requests == 1


async def test_end_to_end_with_verify_bearer(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    import time

    endpoint = TokenEndpoint(time.time, lifetime=600)
    app = web.Application()
    app.router.add_post("/oauth/token", endpoint.handle)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:
        src = TokenSource(session, str(server.make_url("/oauth/token")), ACCESS_KEY, audience=AUD)
        token = await src.token()
        await src.close()
        assert not session.closed  # a borrowed session is the caller's to close
    claims = verify_bearer(f"Bearer {token}", KEY, algorithms=["HS256"], audience=AUD)
    assert claims["sub"] == "sidecar-a"


async def test_close_during_a_fetch(env: Env) -> None:
    env.endpoint.delay = 1.0
    src = env.make()
    waiter = asyncio.ensure_future(src.token())
    await asyncio.sleep(0.05)
    await src.close()
    with pytest.raises(CoordinatorUnavailable, match="closed"):
        await waiter
    with pytest.raises(CoordinatorUnavailable, match="closed"):
        await src.token()
