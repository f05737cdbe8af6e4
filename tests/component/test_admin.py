"""The admin listener: metrics, health, readiness and the token-protected /admin/* pages."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from aiohttp import web

from tests.component.servers import closed_port


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _app(aiohttp_server):
    app = web.Application()
    app.router.add_get("/", _ok)
    return await aiohttp_server(app)


async def test_metrics_export_requests_pools_and_build_info(sidecar_factory, aiohttp_server):
    server = await _app(aiohttp_server)
    sc = await sidecar_factory({"app": {"url": f"http://127.0.0.1:{server.port}"}})
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{sc.ports['inbound']}/") as r:
            assert r.status == 200
        async with s.get(f"http://127.0.0.1:{sc.ports['admin']}/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    assert 'gts_sidecar_requests_total{listener="inbound",status="200",upstream="app"} 1.0' in text
    assert 'gts_sidecar_request_duration_seconds_count{listener="inbound",upstream="app"} 1.0' in (
        text
    )
    assert 'gts_sidecar_pool_connections_idle{upstream="app"} 1.0' in text
    assert 'gts_sidecar_pool_connections_in_use{upstream="app"} 0.0' in text
    assert "gts_sidecar_build_info{" in text
    for line in text.splitlines():
        if line and not line.startswith(("#", "process_", "python_")):  # standard collectors
            assert line.startswith("gts_sidecar_"), line


async def test_readyz_is_false_while_the_app_is_unreachable(sidecar_factory):
    port = closed_port()
    sc = await sidecar_factory({"app": {"url": f"http://127.0.0.1:{port}"}})
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{sc.ports['admin']}/healthz") as r:
            assert r.status == 200
        async with s.get(f"http://127.0.0.1:{sc.ports['admin']}/readyz") as r:
            assert r.status == 503
            body = await r.json()
    assert body["ready"] is False
    assert f"app at 127.0.0.1:{port} is unreachable" in body["reasons"][0]


async def test_metrics_can_be_turned_off(sidecar_factory):
    sc = await sidecar_factory({"metrics": {"enabled": False}})
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{sc.ports['admin']}/metrics") as r:
            assert r.status == 404
            assert r.headers["x-gts-sidecar-error"] == "NOT_FOUND"
            assert "metrics.enabled" in (await r.json())["error"]["message"]
        async with s.get(f"http://127.0.0.1:{sc.ports['admin']}/healthz") as r:
            assert r.status == 200  # the rest of the admin listener is unaffected


async def test_readyz_is_true_when_the_app_answers(sidecar_factory, aiohttp_server):
    server = await _app(aiohttp_server)
    sc = await sidecar_factory({"app": {"url": f"http://127.0.0.1:{server.port}"}})
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{sc.ports['admin']}/readyz") as r:
            assert r.status == 200
            assert (await r.json()) == {"ready": True}


async def test_admin_config_needs_the_token_and_never_shows_it(
    sidecar_factory, aiohttp_server, tmp_path: Path
):
    token = tmp_path / "admin-token"
    token.write_text("s3cr3t-admin-token\n")
    server = await _app(aiohttp_server)
    sc = await sidecar_factory(
        {
            "app": {"url": f"http://127.0.0.1:{server.port}"},
            "admin": {"token_file": str(token)},
        }
    )
    url = f"http://127.0.0.1:{sc.ports['admin']}/admin/config"
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            assert r.status == 401
            assert r.headers["x-gts-sidecar-error"] == "UNAUTHORIZED"
        async with s.get(url, headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with s.get(url, headers={"Authorization": "Bearer s3cr3t-admin-token"}) as r:
            assert r.status == 200
            raw = await r.text()
            body = await r.json()
        # metrics and health stay open
        async with s.get(f"http://127.0.0.1:{sc.ports['admin']}/metrics") as r:
            assert r.status == 200
    assert "s3cr3t" not in raw
    assert body["config"]["admin"]["token_file"] == f"<redacted: {token}>"
    assert body["config"]["app"]["url"] == f"http://127.0.0.1:{server.port}"
