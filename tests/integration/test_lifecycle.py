"""The sidecar as a real process: SIGTERM drains in-flight requests, then exits 0."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
from aiohttp import web

from sidecar import config as configmod
from sidecar.coordinator.client import RemoteCoordinator
from sidecar.coordinator.signing import KeyRing
from sidecar.coordinator.states import BranchType
from sidecar.metrics import Metrics
from tests.integration.proc import start_sidecar, write_config


async def test_sigterm_finishes_in_flight_request_then_exits_zero(
    tmp_path: Path, aiohttp_server
) -> None:
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.Response(text="finished")

    app = web.Application()
    app.router.add_get("/slow", slow)
    server = await aiohttp_server(app)
    cfg = write_config(
        tmp_path / "sidecar.yaml",
        {"app": {"url": f"http://127.0.0.1:{server.port}"}, "drain_timeout": "30s"},
    )
    sc = await start_sidecar(cfg)
    try:
        async with aiohttp.ClientSession() as session:
            in_flight = asyncio.ensure_future(
                session.get(f"http://127.0.0.1:{sc.ports['inbound']}/slow")
            )
            await asyncio.wait_for(arrived.wait(), 10)
            sc.signal(signal.SIGTERM)

            # readiness goes false while the request is still in flight
            async def not_ready() -> None:
                while True:
                    async with session.get(f"http://127.0.0.1:{sc.ports['admin']}/readyz") as r:
                        if r.status == 503:
                            body = await r.json()
                            assert "draining" in body["reasons"]
                            return
                    await asyncio.sleep(0.02)

            await asyncio.wait_for(not_ready(), 10)
            # the listener no longer accepts new connections
            try:
                _, w = await asyncio.open_connection("127.0.0.1", sc.ports["inbound"])
            except OSError:
                pass
            else:
                w.close()
                raise AssertionError("inbound still accepts connections while draining")
            assert sc.proc.returncode is None
            release.set()
            resp = await asyncio.wait_for(in_flight, 10)
            assert resp.status == 200
            assert await resp.text() == "finished"
            assert resp.headers.get("Connection", "").lower() == "close"
            resp.release()
        assert await sc.wait(20) == 0
    finally:
        release.set()
        await sc.stop()


async def test_drain_timeout_aborts_what_is_left_and_still_exits_zero(
    tmp_path: Path, aiohttp_server
) -> None:
    arrived = asyncio.Event()
    never = asyncio.Event()

    async def stuck(request: web.Request) -> web.Response:
        arrived.set()
        await never.wait()
        return web.Response(text="never")

    app = web.Application()
    app.router.add_get("/stuck", stuck)
    server = await aiohttp_server(app)
    cfg = write_config(
        tmp_path / "sidecar.yaml",
        {"app": {"url": f"http://127.0.0.1:{server.port}"}, "drain_timeout": "300ms"},
    )
    sc = await start_sidecar(cfg)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.ports["inbound"])
        writer.write(b"GET /stuck HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(arrived.wait(), 10)
        sc.signal(signal.SIGTERM)
        assert await sc.wait(20) == 0
        # the client's connection was cut, not left hanging
        assert await asyncio.wait_for(reader.read(-1), 10) == b""
        writer.close()
        assert any(rec.get("msg", "").startswith("drain timeout") for rec in sc.log)
    finally:
        never.set()
        await sc.stop()


async def test_sighup_reloads_and_api_and_peer_listeners_serve_health(
    tmp_path: Path, aiohttp_server
) -> None:
    app = web.Application()
    server = await aiohttp_server(app)
    token = tmp_path / "admin-token"
    token.write_text("t0ken\n")
    admin = {"token_file": str(token)}
    path = write_config(
        tmp_path / "sidecar.yaml",
        {"app": {"url": f"http://127.0.0.1:{server.port}"}, "admin": admin},
    )
    # the watcher is slowed to an hour so that only SIGHUP can cause this reload
    sc = await start_sidecar(path, "--reload-interval", "1h")
    try:
        async with aiohttp.ClientSession() as session:
            for name in ("api", "peer", "admin"):
                async with session.get(f"http://127.0.0.1:{sc.ports[name]}/healthz") as r:
                    assert r.status == 200, name
            write_config(
                path,
                {
                    "app": {"url": f"http://127.0.0.1:{server.port}"},
                    "admin": admin,
                    "drain_timeout": "7s",
                },
            )
            sc.signal(signal.SIGHUP)

            async def reloaded() -> None:
                while True:
                    async with session.get(
                        f"http://127.0.0.1:{sc.ports['admin']}/admin/config",
                        headers={"Authorization": "Bearer t0ken"},
                    ) as r:
                        if (await r.json())["config"]["drain_timeout"] == "7s":
                            return
                    await asyncio.sleep(0.02)

            await asyncio.wait_for(reloaded(), 10)
        sc.signal(signal.SIGTERM)
        assert await sc.wait(20) == 0
        assert any(
            rec.get("msg") == "config reloaded" and rec.get("reason") == "SIGHUP" for rec in sc.log
        )
    finally:
        await sc.stop()


async def test_sigterm_leaves_unfinished_phase_two_journalled_and_it_resumes(
    tmp_path: Path, aiohttp_server
) -> None:
    """Phase two that cannot finish within drain_timeout is left in the journal; the next
    start finishes it."""
    healthy = asyncio.Event()
    confirms: list[str] = []

    async def confirm(request: web.Request) -> web.Response:
        confirms.append(request.headers["Idempotency-Key"])
        if not healthy.is_set():
            return web.json_response({"status": "PhaseTwo_CommitFailed_Retryable"}, status=503)
        return web.json_response({"status": "PhaseTwo_Committed"})

    branch_app = web.Application()
    branch_app.router.add_post("/cb/commit", confirm)
    branch_server = await aiohttp_server(branch_app)
    key = tmp_path / "signing.key"
    key.write_text("lifecycle-key-0123456789abcdef\n")
    signing = {"key_id": "k1", "secret_file": str(key)}
    cfg = write_config(
        tmp_path / "sidecar.yaml",
        {
            "drain_timeout": "300ms",
            "coordinator": {"signing": signing},
            "local_coordinator": {
                "journal": f"sqlite:///{tmp_path.resolve()}/journal.db",
                "phase_two": {"initial": "50ms", "max": "100ms", "max_attempts": 1000},
            },
        },
    )
    sc = await start_sidecar(cfg)
    api = f"http://127.0.0.1:{sc.ports['api']}/v1/transactions"
    try:
        # a branch, registered over the sidecar's own signed GTS REST v1 (its peer listener)
        cc = configmod.parse(
            {"coordinator": {"endpoints": [f"http://127.0.0.1:{sc.ports['peer']}"],
                             "signing": signing}},
            env={},
        )  # fmt: skip
        client = RemoteCoordinator(
            cc.coordinator, KeyRing.from_config(cc.coordinator.signing), Metrics()
        )
        try:
            xid = (await client.begin("t", 60_000)).xid
            await client.register(
                xid, BranchType.TCC, "r", f"http://127.0.0.1:{branch_server.port}/cb", b"{}"
            )
            await client.commit(xid)
        finally:
            await client.close()

        async def retried() -> None:
            while len(confirms) < 2:
                await asyncio.sleep(0.02)

        await asyncio.wait_for(retried(), 10)  # phase two is running, and failing
        sc.signal(signal.SIGTERM)
        assert await sc.wait(20) == 0  # the drain gave up on it within drain_timeout
        healthy.set()
        sc = await start_sidecar(cfg)  # the same journal: phase two resumes and finishes
        api = f"http://127.0.0.1:{sc.ports['api']}/v1/transactions"
        async with aiohttp.ClientSession() as s:

            async def committed() -> None:
                while True:
                    async with s.get(f"{api}/{xid}") as r:
                        if (await r.json())["status"] == "Committed":
                            return
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(committed(), 20)
        assert len(set(confirms)) == 1  # one branch, one stable Idempotency-Key, retried
    finally:
        await sc.stop()
