"""Degraded mode: with the coordinator cluster unreachable, the sidecar coordinates new
transactions itself (XIDs naming it), peers register branches with it, cluster-owned XIDs are
refused, and new begins go back to the cluster once it answers again."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.component.servers import closed_port, free_port
from tests.integration.test_coordinator_e2e import CoordinatorProcess
from tests.integration.test_tcc_e2e import Inventory, wait_for


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "signing.key"
    path.write_text("degraded-signing-secret-0123456789\n")
    return path


def signing(key_file: Path) -> dict[str, str]:
    return {"key_id": "k1", "secret_file": str(key_file)}


async def begin(sc, name: str = "t") -> str:
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"http://127.0.0.1:{sc.ports['api']}/v1/transactions", json={"name": name}
        ) as r:
            assert r.status == 200, await r.text()
            return str((await r.json())["xid"])


async def test_begins_fail_over_to_the_local_coordinator_and_hand_back(
    tmp_path: Path, key_file: Path, sidecar_factory
) -> None:
    port = free_port()
    coordinator = CoordinatorProcess(tmp_path, key_file, peer_port=port)
    await coordinator.start()
    sc = await sidecar_factory(
        {
            "coordinator": {
                "endpoints": [f"http://127.0.0.1:{port}"],
                "signing": signing(key_file),
                "breaker": {"failures": 1, "reset": "200ms"},
                "timeouts": {"connect": "300ms", "request": "1s"},
            },
            "local_coordinator": {"journal": f"sqlite:///{tmp_path.resolve()}/sidecar.db"},
        }
    )
    own = f"127.0.0.1:{sc.ports['peer']}:"
    gauge = lambda: sc.metrics.registry.get_sample_value("gts_sidecar_degraded")  # noqa: E731
    try:
        assert (await begin(sc)).startswith(f"127.0.0.1:{port}:")  # the cluster's
        assert gauge() == 0
        await coordinator.kill(signal.SIGKILL)

        local = await begin(sc)  # the app sees no error
        assert local.startswith(own)
        assert gauge() == 1
        async with aiohttp.ClientSession() as s:
            api = f"http://127.0.0.1:{sc.ports['api']}/v1/transactions"
            async with s.post(f"{api}/{local}/commit") as r:
                assert (await r.json())["status"] == "Committed"  # stays local to the end

        await coordinator.start()  # back, on the same address

        async def handed_back() -> None:
            while not (await begin(sc)).startswith(f"127.0.0.1:{port}:"):
                await asyncio.sleep(0.05)

        await asyncio.wait_for(handed_back(), 20)
        assert gauge() == 0
        assert sc.metrics.registry.get_sample_value("gts_sidecar_degraded_begins_total") >= 1
    finally:
        await coordinator.kill(signal.SIGTERM)


async def test_tcc_in_degraded_mode_registers_with_the_owning_peer(
    tmp_path: Path, key_file: Path, sidecar_factory, aiohttp_server
) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    coordinator_cfg = {
        "endpoints": [dead],
        "signing": signing(key_file),
        "timeouts": {"connect": "300ms", "request": "1s"},
    }
    inventory = Inventory()
    inv_app = web.Application()
    inv_app.router.add_route("*", "/{tail:.*}", inventory.handle)
    inv_server = await aiohttp_server(inv_app)
    participant = await sidecar_factory(
        {
            "app": {"url": f"http://127.0.0.1:{inv_server.port}"},
            "coordinator": coordinator_cfg,
            "local_coordinator": {"journal": f"sqlite:///{tmp_path.resolve()}/p.db"},
            # peers are called only inside these networks, on the participant's peer port
            "degraded": {"peer_networks": ["127.0.0.0/8"]},
            "tcc": [
                {
                    "resource": "inventory-deduct",
                    "try": {"method": "POST", "path": "/deduct"},
                    "confirm": {"method": "POST", "path": "/deduct/confirm"},
                    "cancel": {"method": "POST", "path": "/deduct/cancel"},
                }
            ],
        }
    )
    initiator = await sidecar_factory(
        {
            "coordinator": coordinator_cfg,
            "local_coordinator": {"journal": f"sqlite:///{tmp_path.resolve()}/i.db"},
            # another pod: its own address, the same peer port as every sidecar
            "node": {"advertise_address": "127.0.0.2"},
            "listeners": {"peer": {"bind": f"127.0.0.2:{participant.ports['peer']}"}},
        }
    )
    xid = await begin(initiator)
    assert xid.startswith(f"127.0.0.2:{participant.ports['peer']}:")  # owned by the initiator
    async with aiohttp.ClientSession() as s:
        deduct = f"http://127.0.0.1:{participant.ports['inbound']}/deduct"
        async with s.post(deduct, headers={"XID": xid}, data=b"{}") as r:
            assert r.status == 200  # registered with the initiator's sidecar, signed
        api = f"http://127.0.0.1:{initiator.ports['api']}/v1/transactions"
        async with s.post(f"{api}/{xid}/commit") as r:
            assert (await r.json())["status"] in ("Committed", "Committing")
        await wait_for(lambda: inventory.count()["/deduct/confirm"] == 1)
        assert inventory.count() == Counter({"/deduct": 1, "/deduct/confirm": 1})

        # an XID owned by the (unreachable) cluster: refused, not forwarded, Retry-After
        cluster_xid = f"{dead.removeprefix('http://')}:77"
        async with s.post(deduct, headers={"XID": cluster_xid}, data=b"{}") as r:
            assert r.status == 503
            assert r.headers["x-gts-sidecar-error"] == "COORDINATOR_UNAVAILABLE"
            assert int(r.headers["Retry-After"]) >= 1
        # an XID naming an address outside degraded.peer_networks is never called
        async with s.post(deduct, headers={"XID": "8.8.8.8:17020:5"}, data=b"{}") as r:
            assert r.status == 503
    assert inventory.count()["/deduct"] == 1


async def test_a_decision_the_cluster_cannot_take_is_journalled_and_resent(
    tmp_path: Path, key_file: Path, sidecar_factory
) -> None:
    port = free_port()
    coordinator = CoordinatorProcess(tmp_path, key_file, peer_port=port)
    await coordinator.start()
    sc = await sidecar_factory(
        {
            "coordinator": {
                "endpoints": [f"http://127.0.0.1:{port}"],
                "signing": signing(key_file),
                "breaker": {"failures": 1, "reset": "200ms"},
                "timeouts": {"connect": "300ms", "request": "1s"},
            },
            "local_coordinator": {"journal": f"sqlite:///{tmp_path.resolve()}/sidecar.db"},
        }
    )
    api = f"http://127.0.0.1:{sc.ports['api']}/v1/transactions"
    try:
        xid = await begin(sc)
        assert xid.startswith(f"127.0.0.1:{port}:")  # cluster-owned
        await coordinator.kill(signal.SIGKILL)
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{api}/{xid}/commit") as r:
                assert r.status == 503
                assert r.headers["x-gts-transaction-status"] == "Unknown"
                assert "journalled" in (await r.json())["error"]["message"]
            assert await sc.control.router.outbox.pending() == [(xid, True)]

            await coordinator.start()  # the cluster returns: the commit is delivered

            async def delivered() -> None:
                while await sc.control.router.outbox.pending():
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(delivered(), 20)
            async with s.get(f"{api}/{xid}") as r:
                assert (await r.json())["status"] == "Committed"
    finally:
        await coordinator.kill(signal.SIGTERM)
