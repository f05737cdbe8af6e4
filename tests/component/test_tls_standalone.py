"""The standalone coordinator (`gts-sidecar coordinator`) terminates TLS on its peer and
admin listeners and re-reads the certificate files when they change, though its config does
not reload."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sidecar import config as configmod
from sidecar.metrics import Metrics
from sidecar.standalone import StandaloneCoordinator
from tests.component.servers import wait_until
from tests.component.tlsfiles import Pki, SecretDir, pair_files, peer_common_name
from tests.conftest import LOOPBACK_LISTENERS


async def _served_name(port: int, pki: Pki) -> str:
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=pki.client_context(), server_hostname="localhost"
    )
    try:
        return peer_common_name(writer.get_extra_info("ssl_object"))
    finally:
        writer.close()


async def test_standalone_coordinator_serves_tls_and_rotates_it(tmp_path: Path) -> None:
    pki = Pki(tmp_path, "ca")
    secret = SecretDir(tmp_path / "tls")
    secret.publish(pair_files(pki.issue(common_name="first")))
    tls = {"cert_file": secret.path("tls.crt"), "key_file": secret.path("tls.key")}
    cfg = configmod.parse(
        {
            "listeners": {
                **LOOPBACK_LISTENERS,
                "peer": {"bind": "127.0.0.1:0", "tls": tls},
                "admin": {"bind": "127.0.0.1:0", "tls": tls},
            },
            "logging": {"level": "warning"},
            "local_coordinator": {"journal": "memory://"},
        },
        env={},
    )
    coordinator = StandaloneCoordinator(cfg, metrics=Metrics())
    await coordinator.start()
    try:
        assert await _served_name(coordinator.ports["peer"], pki) == "first"
        assert await _served_name(coordinator.ports["admin"], pki) == "first"
        secret.publish(pair_files(pki.issue(common_name="second")))

        def reloaded() -> bool:
            value = coordinator.metrics.registry.get_sample_value(
                "gts_sidecar_tls_reloads_total", {"result": "applied"}
            )
            return value == 1

        await wait_until(reloaded, timeout=10)
        assert await _served_name(coordinator.ports["peer"], pki) == "second"
        assert await _served_name(coordinator.ports["admin"], pki) == "second"
    finally:
        await coordinator.close()
        await coordinator.control.stop(0)
