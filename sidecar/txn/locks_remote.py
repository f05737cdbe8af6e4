"""`locks.backend: coordinator`: the sidecar's global locks are the coordinator cluster's
(replicas of `gts-sidecar coordinator` on PostgreSQL, which share them and release them with
their transactions' final state: coordinator/pg_locks.py). The api listener's `/v1/locks`
calls become signed calls to the cluster's `/api/v1/locks`, with the client's failover
between endpoints (the XID's own replica first).

Rules: the same as txn/locks.py, plus those of the cluster: the holder must be a transaction
the cluster coordinates, still in Begin (TRANSACTION_NOT_FOUND / TRANSACTION_NOT_ACTIVE
otherwise), and while no replica answers an acquire fails with COORDINATOR_UNAVAILABLE
(never taken locally: a lock only one sidecar knows protects nothing). `may_hold` is False:
the cluster releases a transaction's locks itself when it ends, so the sidecar's own release
on finish has nothing to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final
from urllib.parse import quote

import orjson

from sidecar.coordinator.client import RemoteCoordinator
from sidecar.coordinator.protocol import API
from sidecar.errors import CoordinatorUnavailable
from sidecar.txn.locks import check_key, check_keys
from sidecar.xid import parse as parse_xid

_XID_MAX: Final = 4096


class CoordinatorLocks:
    """Global locks held by the coordinator cluster; see the module docstring."""

    def __init__(self, default_ttl: float | None = None) -> None:
        #: the longest timeout an acquire may ask for (local_coordinator.max_timeout)
        self.default_ttl = default_ttl
        #: the cluster's client, set once it exists (control.py makes it after the locks)
        self.client: RemoteCoordinator | None = None

    def _client(self) -> RemoteCoordinator:
        if self.client is None:
            raise CoordinatorUnavailable(
                "locks.backend is coordinator but no coordinator.endpoints are configured"
            )
        return self.client

    async def acquire(self, xid: str, keys: Sequence[str], *, ttl: float | None = None) -> None:
        xid = parse_xid(xid, max_length=_XID_MAX).raw
        body: dict[str, object] = {"xid": xid, "keys": check_keys(list(keys))}
        if ttl is not None:
            body["timeout"] = f"{max(1, round(ttl * 1000))}ms"
        await self._client().call_json(
            "lock", "POST", f"{API}/locks", orjson.dumps(body), xid=xid
        )  # LOCK_CONFLICT comes back as LockConflict, with the holder and the key

    async def release_all(self, xid: str) -> int:
        xid = parse_xid(xid, max_length=_XID_MAX).raw
        data = await self._client().call_json(
            "unlock", "DELETE", f"{API}/locks/{quote(xid, safe='')}", b"", xid=xid
        )
        return int(data.get("released", 0))

    async def holder(self, key: str) -> str | None:
        key = check_key(key)
        data = await self._client().call_json(
            "lock_holder", "GET", f"{API}/locks/{quote(key, safe=':/')}", b""
        )
        found = data.get("holder")
        return None if found is None else str(found)

    def may_hold(self, xid: str) -> bool:
        return False  # released by the cluster with the transaction's final state

    async def close(self) -> None:
        pass  # the client is the control plane's to close
