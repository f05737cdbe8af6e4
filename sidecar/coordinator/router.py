"""Which coordinator a call goes to: the cluster, this sidecar's own engine, or a peer's.

Rules for a sidecar that has a cluster configured (DESIGN §1, §3):
- begin: the cluster; if it cannot be reached within the call timeout (or its breaker is
  open), this sidecar's local engine begins it in the same request — the XID then names this
  sidecar's peer address, and the transaction stays local until it finishes;
- anything about an XID goes to the XID's owner: this sidecar's engine when the XID is its
  own; a peer sidecar (degraded elsewhere) when the owner's address is in
  `degraded.peer_networks` and is not a cluster endpoint; otherwise the cluster;
- a branch registration for a cluster-owned XID while the cluster is unreachable is refused
  (`degraded.remote_xid_policy: reject`): the try is not forwarded and the initiator, seeing
  the failure, rolls back. Coordinating it locally instead would let one transaction's
  branches follow two coordinators that never agree on its outcome.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from sidecar.config import CoordinatorConfig, DegradedConfig
from sidecar.coordinator.client import LocalCoordinator, RemoteCoordinator, TxState
from sidecar.coordinator.outbox import MAX_ITEMS, DecisionPending, Outbox
from sidecar.coordinator.signing import KeyRing
from sidecar.coordinator.states import BranchStatus, BranchType
from sidecar.errors import CoordinatorUnavailable, XidInvalid
from sidecar.metrics import Metrics
from sidecar.xid import parse as parse_xid

log = logging.getLogger("sidecar.router")

#: seconds a refused caller should wait before trying again (the breaker's probe interval)
RETRY_AFTER_HEADER = "Retry-After"


class ClusterUnavailableForXid(CoordinatorUnavailable):
    """A call about a cluster-owned XID while the cluster is unreachable."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RoutingCoordinator:
    def __init__(
        self,
        local: LocalCoordinator,
        remote: RemoteCoordinator,
        cfg: CoordinatorConfig,
        degraded: DegradedConfig,
        ring: KeyRing,
        metrics: Metrics,
        outbox_path: str | None = None,
        outbox_max_items: int = MAX_ITEMS,
    ) -> None:
        self.outbox = Outbox(outbox_path, self._resend, max_items=outbox_max_items, metrics=metrics)
        self.local = local
        self.remote = remote
        self.cfg = cfg
        self.ring = ring
        self.metrics = metrics
        self.networks = [ipaddress.ip_network(n, strict=False) for n in degraded.peer_networks]
        self._peers: dict[str, RemoteCoordinator] = {}
        self.degraded = False

    @property
    def own(self) -> str:
        return self.local.engine.owner

    async def open(self) -> None:
        await self.outbox.open()

    async def close(self) -> None:
        await self.outbox.close()
        for peer in self._peers.values():
            await peer.close()

    async def _resend(self, xid: str, commit: bool) -> str:
        state = await (self.remote.commit if commit else self.remote.rollback)(xid)
        return state.status

    # --- routing --------------------------------------------------------------------------

    def _for_xid(self, xid: str) -> LocalCoordinator | RemoteCoordinator:
        try:
            owner = parse_xid(xid).owner
        except XidInvalid:
            return self.remote  # let the cluster say what is wrong with it
        if owner == self.own:
            return self.local
        if owner.lower() in self.remote._authority:
            return self.remote
        peer = self._peer(owner)
        return peer if peer is not None else self.remote

    def _peer(self, owner: str) -> RemoteCoordinator | None:
        """A client of the peer sidecar that owns an XID, if its address may be called."""
        peer = self._peers.get(owner)
        if peer is not None:
            return peer
        host = owner.rpartition(":")[0].strip("[]")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return None  # only addresses: a name could resolve anywhere
        if not any(address in net for net in self.networks):
            log.warning("XID owner outside degraded.peer_networks", extra={"owner": owner})
            return None
        peer = RemoteCoordinator(
            self.cfg.model_copy(update={"endpoints": [f"http://{owner}"]}),
            self.ring,
            self.metrics,
        )
        self._peers[owner] = peer
        return peer

    def _refuse_if_cluster_down(self, target: Any, xid: str) -> None:
        if target is self.remote and not self.remote.breaker.allow_peek():
            wait = max(1.0, self.remote.breaker.seconds_until_probe())
            raise ClusterUnavailableForXid(
                f"the coordinator cluster that owns {xid} is unreachable; retry in "
                f"{wait:.0f}s (degraded.remote_xid_policy: reject)",
                retry_after=wait,
            )

    # --- Coordinator ----------------------------------------------------------------------

    async def begin(
        self, name: str, timeout_ms: int | None, idempotency_key: str | None = None
    ) -> TxState:
        try:
            if not self.remote.breaker.allow_peek():
                # the breaker is open: no call would go out; skip straight to the local engine
                raise CoordinatorUnavailable("circuit breaker open")
            state = await self.remote.begin(name, timeout_ms, idempotency_key)
        except CoordinatorUnavailable as exc:
            state = await self.local.begin(name, timeout_ms, idempotency_key)
            if not self.degraded:
                log.warning(
                    "coordinator cluster unreachable: coordinating locally (degraded mode)",
                    extra={"error": exc.message},
                )
            self.degraded = True
            self.metrics.degraded.set(1)
            self.metrics.degraded_begins.inc()
            return state
        if self.degraded:
            log.info("coordinator cluster is back: new transactions go to it again")
        self.degraded = False
        self.metrics.degraded.set(0)
        return state

    async def commit(self, xid: str) -> TxState:
        return await self._decide(xid, True)

    async def rollback(self, xid: str) -> TxState:
        return await self._decide(xid, False)

    async def _decide(self, xid: str, commit: bool) -> TxState:
        target = self._for_xid(xid)
        try:
            return await (target.commit if commit else target.rollback)(xid)
        except CoordinatorUnavailable as exc:
            if target is not self.remote:
                raise
            # a cluster-owned decision the cluster cannot take now: journal it, re-send it
            # when it returns, and say the outcome is unknown meanwhile
            await self.outbox.record(xid, commit, exc.message)  # OutboxFull when at its cap
            raise DecisionPending(xid, commit, exc.message) from None

    async def status(self, xid: str) -> dict[str, Any]:
        return await self._for_xid(xid).status(xid)

    async def register(
        self,
        xid: str,
        branch_type: BranchType,
        resource_id: str,
        callback_url: str,
        application_data: bytes,
        idempotency_key: str | None = None,
    ) -> int:
        target = self._for_xid(xid)
        self._refuse_if_cluster_down(target, xid)
        try:
            return await target.register(
                xid, branch_type, resource_id, callback_url, application_data, idempotency_key
            )
        except ClusterUnavailableForXid:
            raise
        except CoordinatorUnavailable as exc:
            if target is not self.remote:
                raise
            raise ClusterUnavailableForXid(
                f"{exc.message} (degraded.remote_xid_policy: reject)",
                retry_after=max(1.0, self.remote.breaker.seconds_until_probe()),
            ) from None

    async def report(self, xid: str, branch_id: int, status: BranchStatus) -> None:
        await self._for_xid(xid).report(xid, branch_id, status)
