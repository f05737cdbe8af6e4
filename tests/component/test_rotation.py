"""Rotation without restarts: certificates, keys and every `*_file` secret are re-read when
the file changes (a Kubernetes Secret update swaps its `..data` symlink), and signing keys
rotate by reload. A bad new version is refused, logged and counted; the old one stays."""

from __future__ import annotations

import asyncio
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from sidecar import config as configmod
from sidecar.metrics import Metrics
from sidecar.reload import file_digest
from sidecar.server import Sidecar
from tests.component.gts import SECRET_K1, BranchServer, SignedClient, ring
from tests.component.servers import wait_until
from tests.component.tlsfiles import Pki, SecretDir, pair_files, peer_common_name
from tests.conftest import LOOPBACK_LISTENERS, merge

SECRET_K2 = "k2-secret-00112233445566778899aabbccdd"


def _metric(sc: Sidecar, name: str, labels: dict[str, str]) -> float:
    return sc.metrics.registry.get_sample_value(name, labels) or 0.0


class Running:
    """A sidecar started from a config file it watches (every 20 ms), and that file."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self.sc: Sidecar | None = None

    async def start(self) -> Sidecar:
        self.write(self.data)
        self.sc = Sidecar(
            configmod.load(self.path),
            config_path=str(self.path),
            config_digest=file_digest(self.path),
            metrics=Metrics(),
            reload_interval=0.02,
        )
        await self.sc.start()
        return self.sc

    def write(self, data: dict[str, Any]) -> None:
        self.data = data
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(data))
        tmp.replace(self.path)

    def reloads(self, result: str) -> float:
        assert self.sc is not None
        return _metric(self.sc, "gts_sidecar_config_reloads_total", {"result": result})


@pytest.fixture
async def running(tmp_path: Path):
    started: list[Running] = []

    def make(overrides: dict[str, Any]) -> Running:
        base = {
            "listeners": LOOPBACK_LISTENERS,
            "logging": {"level": "warning"},
            "local_coordinator": {"journal": "memory://"},
        }
        r = Running(tmp_path / "sidecar.yaml", merge(base, overrides))
        started.append(r)
        return r

    yield make
    for r in started:
        if r.sc is not None:
            await r.sc.close()


async def _served_name(port: int, ctx: ssl.SSLContext) -> str:
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    try:
        return peer_common_name(writer.get_extra_info("ssl_object"))
    finally:
        writer.close()


async def test_a_certificate_swapped_under_a_running_sidecar_is_served_next(
    running, tmp_path: Path, aiohttp_server
) -> None:
    pki = Pki(tmp_path, "ca")
    secret = SecretDir(tmp_path / "tls")
    secret.publish(pair_files(pki.issue(common_name="first")))
    tls = {"cert_file": secret.path("tls.crt"), "key_file": secret.path("tls.key")}
    r = running({"listeners": {"inbound": {"bind": "127.0.0.1:0", "tls": tls}}})
    sc = await r.start()
    port, client = sc.ports["inbound"], pki.client_context()

    # a connection open across the swap keeps its certificate; the next one gets the new one
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client, server_hostname="localhost"
    )
    assert peer_common_name(writer.get_extra_info("ssl_object")) == "first"
    secret.publish(pair_files(pki.issue(common_name="second")))
    await wait_until(
        lambda: _metric(sc, "gts_sidecar_tls_reloads_total", {"result": "applied"}) == 1
    )
    assert await _served_name(port, client) == "second"
    assert peer_common_name(writer.get_extra_info("ssl_object")) == "first"
    writer.close()

    # a bad new pair (the key of another certificate) is refused; "second" stays
    bad = pair_files(pki.issue(common_name="third"))
    bad["tls.key"] = pair_files(pki.issue())["tls.key"]
    secret.publish(bad)
    await wait_until(
        lambda: _metric(sc, "gts_sidecar_tls_reloads_total", {"result": "invalid"}) == 1
    )
    assert r.reloads("invalid") == 1
    assert await _served_name(port, client) == "second"

    # an expired certificate is refused too
    secret.publish(pair_files(pki.issue(common_name="expired", expired=True)))
    await wait_until(
        lambda: _metric(sc, "gts_sidecar_tls_reloads_total", {"result": "invalid"}) == 2
    )
    assert await _served_name(port, client) == "second"

    # and a good one after them is taken; the expiry gauge follows the certificate served
    later = datetime.now(UTC) + timedelta(days=90)
    secret.publish(pair_files(pki.issue(common_name="fourth", not_after=later)))
    await wait_until(
        lambda: _metric(sc, "gts_sidecar_tls_reloads_total", {"result": "applied"}) == 2
    )
    assert await _served_name(port, client) == "fourth"
    expiry = _metric(
        sc, "gts_sidecar_tls_certificate_expiry_timestamp_seconds", {"name": "listener:inbound"}
    )
    assert expiry == int(later.timestamp())


async def test_a_rotated_client_ca_applies_to_the_next_handshake(running, tmp_path: Path) -> None:
    pki, old_clients, new_clients = (Pki(tmp_path, n) for n in ("ca", "old", "new"))
    secret = SecretDir(tmp_path / "ca", keys=("ca.crt",))
    secret.publish({"ca.crt": Path(old_clients.ca_file).read_bytes()})
    server = pki.issue()
    tls = {
        "cert_file": server.cert,
        "key_file": server.key,
        "client_ca_file": secret.path("ca.crt"),
    }
    r = running({"listeners": {"admin": {"bind": "127.0.0.1:0", "tls": tls}}})
    sc = await r.start()
    url = f"https://localhost:{sc.ports['admin']}/healthz"

    async def status(clients: Pki) -> int | str:
        ctx = pki.client_context(clients.issue())
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(url, ssl=ctx, server_hostname="localhost") as resp:
                    return resp.status
        except (aiohttp.ClientError, ssl.SSLError, ConnectionError) as exc:
            return type(exc).__name__

    assert await status(old_clients) == 200
    assert await status(new_clients) != 200
    secret.publish({"ca.crt": Path(new_clients.ca_file).read_bytes()})
    await wait_until(lambda: r.reloads("applied") == 1)
    assert await status(new_clients) == 200
    assert await status(old_clients) != 200


async def test_a_rotated_upstream_ca_applies_to_new_connections(
    running, tmp_path: Path, aiohttp_server
) -> None:
    old_ca, new_ca = Pki(tmp_path, "old"), Pki(tmp_path, "new")

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    app.router.add_get("/x", hello)
    server = await aiohttp_server(app, ssl=new_ca.server_context(new_ca.issue()))
    secret = SecretDir(tmp_path / "trust", keys=("ca.crt",))
    secret.publish({"ca.crt": Path(old_ca.ca_file).read_bytes()})
    upstream = {
        "url": f"https://localhost:{server.port}",
        "tls": {"ca_file": secret.path("ca.crt")},
    }
    r = running({"upstreams": {"secure": upstream}})
    sc = await r.start()
    url = f"http://127.0.0.1:{sc.ports['outbound']}/secure/x"
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as resp:
            assert resp.status == 502  # the server's certificate is not from the trusted CA
        secret.publish({"ca.crt": Path(new_ca.ca_file).read_bytes()})
        await wait_until(lambda: r.reloads("applied") == 1)
        async with s.get(url) as resp:
            assert resp.status == 200 and await resp.text() == "hi"


async def test_a_rotated_admin_token_applies_without_a_restart(running, tmp_path: Path) -> None:
    secret = SecretDir(tmp_path / "admin", keys=("token",))
    secret.publish({"token": b"old-token\n"})
    r = running({"admin": {"token_file": secret.path("token")}})
    sc = await r.start()
    url = f"http://127.0.0.1:{sc.ports['admin']}/admin/config"

    async def status(token: str) -> int:
        async with aiohttp.ClientSession() as s:
            async with s.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
                return resp.status

    assert (await status("old-token"), await status("new-token")) == (200, 401)
    secret.publish({"token": b"new-token\n"})
    await wait_until(lambda: r.reloads("applied") == 1)
    assert (await status("old-token"), await status("new-token")) == (401, 200)
    # an empty token file is refused: the new token stays in force
    secret.publish({"token": b"\n"})
    await wait_until(lambda: r.reloads("invalid") == 1)
    assert await status("new-token") == 200


def _signing(tmp_path: Path, current: tuple[str, str], *previous: tuple[str, str]) -> dict:
    def key(key_id: str, secret: str) -> dict[str, str]:
        path = tmp_path / f"signing-key-{key_id}"
        path.write_text(secret + "\n")
        return {"key_id": key_id, "secret_file": str(path)}

    cfg: dict[str, Any] = key(*current)
    if previous:
        cfg["previous"] = [key(*p) for p in previous]
    return {"signing": cfg}


async def test_signing_keys_rotate_by_reload_without_a_restart(running, tmp_path: Path) -> None:
    k1, k2 = ("k1", SECRET_K1), ("k2", SECRET_K2)
    branches = await BranchServer(keys=ring(*k2)).start()
    r = running({"coordinator": _signing(tmp_path, k1)})
    sc = await r.start()
    engine_ring = sc.control.ring
    try:
        async with aiohttp.ClientSession() as session:
            old = SignedClient(session, sc.ports["peer"], ring(*k1))
            new = SignedClient(session, sc.ports["peer"], ring(*k2))
            await old.start()
            refused = await new.call("POST", "/api/v1/transaction/start", {"name": "x"})
            assert (refused.status, refused.error["code"]) == (401, "SIGNATURE_INVALID")

            # step 1: k2 signs, k1 still verifies (callers not yet rotated keep working)
            r.write(merge(r.data, {"coordinator": _signing(tmp_path, k2, k1)}))
            await wait_until(lambda: r.reloads("applied") == 1)
            assert sc.control.ring is engine_ring and engine_ring.key_id == "k2"
            xid = await old.start()
            xid2 = await new.start()
            # the sidecar's own calls are signed with k2 now: a branch that verifies k2 only
            branch = await new.register(xid2, branches.url("stock"))
            assert branch
            done = await new.call("POST", f"/api/v1/transaction/{xid2}/commit".replace(":", "%3A"))
            assert done.status == 200, done.raw
            await wait_until(lambda: len(branches.calls) == 1)
            assert branches.calls[0].signature_error is None
            assert branches.calls[0].headers["x-gts-key-id"] == "k2"

            # step 2: k1 removed: refused, with no restart at any step
            r.write(merge(r.data, {"coordinator": {"signing": {"previous": []}}}))
            await wait_until(lambda: r.reloads("applied") == 2)
            refused = await old.call("GET", f"/api/v1/transaction/{xid}".replace(":", "%3A"))
            assert (refused.status, refused.error["code"]) == (401, "SIGNATURE_INVALID")
            assert (
                await new.call("POST", "/api/v1/transaction/start", {"name": "y"})
            ).status == 200
    finally:
        await branches.close()


async def test_other_coordinator_changes_still_need_a_restart(running, tmp_path: Path) -> None:
    r = running({"coordinator": _signing(tmp_path, ("k1", SECRET_K1))})
    sc = await r.start()
    r.write(merge(r.data, {"coordinator": {"timeouts": {"request": "2s"}}}))
    await wait_until(lambda: r.reloads("invalid") == 1)
    assert sc.config.coordinator.timeouts.request == 3.0
    # degraded: the routing coordinator keeps what it started with, so a change is refused
    r.write(
        merge(
            r.data, {"coordinator": {"timeouts": {"request": "3s"}}, "degraded": {"max_peers": 5}}
        )
    )
    await wait_until(lambda: r.reloads("invalid") == 2)
    assert sc.config.degraded.max_peers != 5


async def test_a_rotated_phase_two_header_is_sent_with_the_next_phase_two(
    running, tmp_path: Path, aiohttp_server
) -> None:
    import base64

    import orjson

    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    server = await aiohttp_server(app)
    secret = SecretDir(tmp_path / "inventory", keys=("phase-two-token",))
    secret.publish({"phase-two-token": b"Bearer old\n"})
    endpoint = {"method": "POST"}
    r = running(
        {
            "app": {"url": f"http://127.0.0.1:{server.port}"},
            "tcc": [
                {
                    "resource": "inv",
                    "try": {**endpoint, "path": "/try"},
                    "confirm": {**endpoint, "path": "/confirm"},
                    "cancel": {**endpoint, "path": "/cancel"},
                    "phase_two_headers": [
                        {"name": "Authorization", "value_file": secret.path("phase-two-token")}
                    ],
                }
            ],
        }
    )
    sc = await r.start()
    participant = sc.control.participant
    assert participant is not None
    xid = "10.0.0.5:17020:42"

    async def confirm(branch_id: int) -> None:
        await participant.begin_try(xid, branch_id, "inv")
        participant.end_try(xid, branch_id, answered=True)
        body = {
            "xid": xid,
            "branchId": branch_id,
            "resourceId": "inv",
            "applicationData": {"body": base64.b64encode(b"{}").decode(), "headers": {}},
        }
        answer = await participant.phase_two("inv", True, orjson.dumps(body))
        assert answer["status"] == "PhaseTwo_Committed", answer

    await confirm(1)
    secret.publish({"phase-two-token": b"Bearer new\n"})
    await wait_until(lambda: r.reloads("applied") == 1)
    await confirm(2)
    assert seen == ["Bearer old", "Bearer new"]
