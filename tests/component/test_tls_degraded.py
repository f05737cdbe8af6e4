"""Degraded mode with TLS on the peer listeners: with the cluster down, a branch whose XID a
peer sidecar owns is registered with that peer over https (this sidecar's own peer listener
terminates TLS, so its peers' do too), trusting coordinator.tls's CA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.component.servers import closed_port
from tests.component.tlsfiles import Pki

TCC = [
    {
        "resource": "inv",
        "try": {"method": "POST", "path": "/deduct"},
        "confirm": {"method": "POST", "path": "/deduct/confirm"},
        "cancel": {"method": "POST", "path": "/deduct/cancel"},
    }
]


async def test_a_degraded_peer_is_called_over_https(
    sidecar_factory, aiohttp_server, tmp_path: Path
) -> None:
    pki = Pki(tmp_path, "ca")
    app_calls: list[str] = []
    peer_calls: list[str] = []

    async def app_handler(request: web.Request) -> web.Response:
        app_calls.append(request.path)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", app_handler)
    app_server = await aiohttp_server(app)

    own = pki.issue("127.0.0.1")
    sc = await sidecar_factory(
        {
            "app": {"url": f"http://127.0.0.1:{app_server.port}"},
            "listeners": {
                "peer": {"bind": "127.0.0.1:0", "tls": {"cert_file": own.cert, "key_file": own.key}}
            },
            "coordinator": {
                "endpoints": [f"http://127.0.0.1:{closed_port()}"],
                "timeouts": {"connect": "300ms", "request": "1s"},
                "tls": {"ca_file": pki.ca_file},
            },
            "degraded": {"peer_networks": ["127.0.0.0/8"]},
            "tcc": TCC,
        }
    )

    async def peer_handler(request: web.Request) -> web.Response:
        peer_calls.append(f"{request.method} {request.path}")
        return web.json_response({"branchId": "5"})

    peer = web.Application()
    peer.router.add_route("*", "/{tail:.*}", peer_handler)
    runner = web.AppRunner(peer)
    await runner.setup()
    port = sc.ports["peer"]  # peers listen on the same peer port number
    ssl_ctx = pki.server_context(pki.issue("127.0.0.2"))
    await web.TCPSite(runner, "127.0.0.2", port, ssl_context=ssl_ctx).start()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(
                f"http://127.0.0.1:{sc.ports['inbound']}/deduct",
                headers={"XID": f"127.0.0.2:{port}:42"},
                data=b"{}",
            ) as r:
                body: Any = await r.text()
                assert r.status == 200, body
        assert peer_calls[0] == "POST /api/v1/branch/register"
        assert app_calls == ["/deduct"]
    finally:
        await runner.cleanup()
