"""`locks.backend: coordinator`: two real sidecars whose global locks are those of a real
replicated coordinator (three `gts-sidecar coordinator` processes on one real PostgreSQL).
An app locks keys through its sidecar A; another app's transaction, through sidecar B, is
refused with the holder; the replica that began the transaction is SIGKILLed, and the
cluster releases the locks when the transaction commits (decided through A's TM API, the
sidecar failing over to another replica, which ends it), and B then gets them. A lock for
an XID the cluster does not coordinate is refused, never taken locally."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.faults.procs import signing, start_sidecar, write_config
from tests.integration.proc import SidecarProcess
from tests.integration.test_replicas_pg import replicas
from tests.pg_server import PgCluster, pg_server  # noqa: F401

pytestmark = pytest.mark.slow


async def sidecar(tmp: Path, endpoints: list[str]) -> SidecarProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = {
        "coordinator": {"endpoints": endpoints, "signing": signing(tmp)},
        "locks": {"backend": "coordinator"},
    }
    return await start_sidecar(write_config(tmp / "sidecar.yaml", cfg))


async def call(
    session: aiohttp.ClientSession, sp: SidecarProcess, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{sp.ports['api']}{path}"
    async with session.request(method, url, json=body) as r:
        return r.status, await r.json()


async def test_sidecars_share_the_clusters_locks(tmp_path: Path, pg_server: PgCluster) -> None:  # noqa: F811
    async with replicas(tmp_path, pg_server, failing=False) as (rs, _):
        endpoints = [c.url for c in rs.coordinators]
        a = await sidecar(tmp_path / "a", endpoints)
        b = await sidecar(tmp_path / "b", endpoints[::-1])
        try:
            async with aiohttp.ClientSession() as s:
                status, begun = await call(s, a, "POST", "/v1/transactions", {"name": "order"})
                assert status == 200, begun
                xid = begun["xid"]
                status, other = await call(s, b, "POST", "/v1/transactions", {"name": "refund"})
                assert status == 200, other

                keys = ["orders:1", "stock:sku-42"]
                status, got = await call(s, a, "POST", "/v1/locks", {"xid": xid, "keys": keys})
                assert (status, got) == (200, {"xid": xid, "keys": keys})
                status, refused = await call(
                    s, b, "POST", "/v1/locks", {"xid": other["xid"], "keys": ["stock:sku-42"]}
                )
                assert status == 409, refused
                assert refused["error"]["code"] == "LOCK_CONFLICT"
                assert refused["error"]["holder"] == xid
                assert refused["error"]["key"] == "stock:sku-42"
                status, seen = await call(s, b, "GET", "/v1/locks/orders:1")
                assert (status, seen) == (200, {"key": "orders:1", "holder": xid})

                # the replica that began the transaction dies: the sidecars fail over, the
                # commit is decided through another replica, which releases the locks
                assert await rs.coordinators[rs.owner_of(xid)].kill(signal.SIGKILL) is not None
                status, seen = await call(s, a, "GET", "/v1/locks/stock:sku-42")
                assert (status, seen["holder"]) == (200, xid)
                status, done = await call(s, a, "POST", f"/v1/transactions/{xid}/commit")
                assert status == 200 and done["status"] == "Committed", done
                status, seen = await call(s, b, "GET", "/v1/locks/orders:1")
                assert (status, seen["holder"]) == (200, None)
                status, got = await call(
                    s, b, "POST", "/v1/locks", {"xid": other["xid"], "keys": ["stock:sku-42"]}
                )
                assert status == 200, got

                # an XID the cluster does not coordinate: refused, not taken locally
                status, unknown = await call(
                    s, a, "POST", "/v1/locks", {"xid": "10.9.9.9:17020:5", "keys": ["pay:1"]}
                )
                assert status == 404 and unknown["error"]["code"] == "TRANSACTION_NOT_FOUND"
                status, seen = await call(s, a, "GET", "/v1/locks/pay:1")
                assert (status, seen["holder"]) == (200, None)
        finally:
            await a.stop()
            await b.stop()
