"""The app slow, silent or resetting, through the fault proxy between the sidecar's inbound
listener and the app: 504 naming the timeout, 502 on a reset, the sidecar stays healthy and
the next request succeeds."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.faults.faultproxy import FaultProxy, Mode
from tests.faults.procs import start_sidecar, write_config
from tests.faults.util import metric, scrape, wait_until
from tests.integration.proc import SidecarProcess

RESPONSE_HEADER, TOTAL = 1.0, 2.0
MARGIN = 4.0


@dataclass
class Env:
    sidecar: SidecarProcess
    proxy: FaultProxy
    seen: Counter[str]
    session: aiohttp.ClientSession

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.sidecar.ports['inbound']}{path}"

    async def ok(self) -> None:
        """The sidecar is healthy and the next request succeeds."""
        assert self.sidecar.proc.returncode is None
        admin = f"http://127.0.0.1:{self.sidecar.ports['admin']}"
        async with self.session.get(admin + "/healthz") as r:
            assert r.status == 200
        async with self.session.get(self.url("/hello")) as r:
            assert r.status == 200 and await r.text() == "hello"


@pytest.fixture
async def env(tmp_path: Path, aiohttp_server: Any) -> AsyncIterator[Env]:
    seen: Counter[str] = Counter()

    async def handle(request: web.Request) -> web.Response:
        seen[f"{request.method} {request.path}"] += 1
        await request.read()
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = await aiohttp_server(app)
    proxy = await FaultProxy("127.0.0.1", server.port).start()
    cfg = {
        "app": {
            "url": proxy.url,
            "timeouts": {
                "connect": "500ms",
                "response_header": f"{RESPONSE_HEADER}s",
                "total": f"{TOTAL}s",
            },
        }
    }
    sc = await start_sidecar(write_config(tmp_path / "sidecar.yaml", cfg))
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    try:
        yield Env(sc, proxy, seen, session)
    finally:
        await session.close()
        await sc.stop()
        await proxy.close()


@pytest.mark.parametrize(
    ("mode", "latency"),
    [
        pytest.param(Mode.LATENCY, 3.0, id="slow"),
        pytest.param(Mode.BLACKHOLE, 0.0, id="silent"),
    ],
)
async def test_slow_app_gets_504_naming_the_timeout(env: Env, mode: Mode, latency: float) -> None:
    await env.ok()
    env.proxy.set_mode(mode, latency_down=latency)  # the app's answer is late
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with env.session.get(env.url("/slow")) as r:
        body = await r.json()
        assert r.status == 504
        assert r.headers["x-gts-sidecar-error"] == "UPSTREAM_TIMEOUT"
        assert body["error"]["code"] == "UPSTREAM_TIMEOUT"
        assert "response header timeout (1s)" in body["error"]["message"]
    assert loop.time() - t0 < RESPONSE_HEADER + MARGIN
    env.proxy.set_mode(Mode.PASS)
    await env.ok()


async def test_app_resetting(env: Env) -> None:
    await env.ok()
    env.seen.clear()
    env.proxy.set_mode(Mode.RESET)  # RST at connect: nothing reaches the app
    for method in ("GET", "POST"):
        async with env.session.request(method, env.url("/r")) as r:
            assert r.status == 502, (method, r.status)
            assert r.headers["x-gts-sidecar-error"] == "UPSTREAM_UNAVAILABLE"
    assert env.seen == Counter()

    # the request reached the app, then the connection was reset: a POST is not retried
    env.proxy.set_mode(Mode.LOSE_ANSWER)
    async with env.session.post(env.url("/pay"), data=b"once") as r:
        assert r.status == 502
        assert r.headers["x-gts-sidecar-error"] == "UPSTREAM_UNAVAILABLE"
        assert "closed the connection" in (await r.json())["error"]["message"]

    await wait_until(lambda: env.seen["POST /pay"] == 1, timeout=5, what=lambda: env.seen)
    env.proxy.set_mode(Mode.PASS)
    await env.ok()
    assert env.seen["POST /pay"] == 1  # exactly once: never re-sent


async def test_idempotent_request_retried_on_a_stale_pooled_connection(env: Env) -> None:
    """A keep-alive connection the app side closed while idle in the pool: a GET is retried
    on a fresh connection (it cannot have reached the app) and succeeds."""
    await env.ok()
    accepted = env.proxy.accepted
    env.seen.clear()
    env.proxy.set_mode(Mode.PASS, cut_existing=True)  # RST every pooled connection
    for _ in range(3):
        async with env.session.get(env.url("/again")) as r:
            assert r.status == 200
    assert env.seen["GET /again"] == 3
    assert env.proxy.accepted > accepted  # fresh connections were opened


async def test_app_refusing_connections_idempotent_requests_retried_once(env: Env) -> None:
    """Connect refused: the request cannot have reached the app, so a GET is retried
    (`retries.attempts`, default 1) and a POST is not; both end 502 and the sidecar stays
    healthy once the app listens again."""
    await env.ok()
    admin = env.sidecar.ports["admin"]
    name = "gts_sidecar_upstream_retries_total"
    await env.proxy.stop_listening()
    # a pooled connection cut by the stop may be tried first (an uncounted retry): use it up
    async with env.session.get(env.url("/flush")) as r:
        assert r.status == 502
    before = metric(await scrape(env.session, admin), name)
    for method, retried in (("GET", 1), ("POST", 0)):
        async with env.session.request(method, env.url("/down")) as r:
            assert r.status == 502, (method, r.status)
            assert r.headers["x-gts-sidecar-error"] == "UPSTREAM_UNAVAILABLE"
        after = metric(await scrape(env.session, admin), name)
        assert after - before == retried, (method, after - before)
        before = after
    await env.proxy.resume_listening()
    await env.ok()
