"""Which coordinator a call goes to: the cluster, this sidecar's own engine, or a peer's.

Rules for a sidecar that has a cluster configured:
- begin: the cluster; if it cannot be reached within the call timeout (or its breaker is
  open), this sidecar's local engine begins it in the same request — the XID then names this
  sidecar's peer address, and the transaction stays local until it finishes;
- anything about an XID goes to the XID's owner: this sidecar's engine when the XID is its
  own; otherwise the cluster (XID affinity only among the configured endpoints). The XID
  is the client's to choose, so its owner is never simply called: a peer sidecar (degraded
  elsewhere) is called only while the cluster is down for this sidecar too (its breaker is
  not closed, it began transactions locally, or the cluster call for this very
  registration just failed), only when the owner is an IP address inside
  `degraded.peer_networks` (default: none) and only on this sidecar's own peer port (every
  sidecar of a mesh uses the same one). A peer once called stays the target for that owner
  (its branch reports, status) while it is in the bounded cache of peer clients
  (`degraded.max_peers`, least recently used out; the clients share one HTTP session);
- every answer is checked: one that lacks what the call needs is 502
  COORDINATOR_INVALID_ANSWER, never an exception in a task;
- a branch registration for a cluster-owned XID while the cluster is unreachable is refused
  (`degraded.remote_xid_policy: reject`): the try is not forwarded and the initiator, seeing
  the failure, rolls back. Coordinating it locally instead would let one transaction's
  branches follow two coordinators that never agree on its outcome.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections import OrderedDict
from collections.abc import Awaitable
from typing import Any, TypeVar

import aiohttp

from sidecar.config import CoordinatorConfig, DegradedConfig
from sidecar.coordinator.breaker import BreakerState
from sidecar.coordinator.client import LocalCoordinator, RemoteCoordinator, TxState
from sidecar.coordinator.outbox import MAX_ITEMS, DecisionPending, Outbox
from sidecar.coordinator.signing import KeyRing
from sidecar.coordinator.states import BranchStatus, BranchType
from sidecar.errors import CoordinatorUnavailable, SidecarError, XidInvalid
from sidecar.metrics import Metrics
from sidecar.schema import replace
from sidecar.xid import parse as parse_xid

log = logging.getLogger("sidecar.router")

#: seconds a refused caller should wait before trying again (the breaker's probe interval)
RETRY_AFTER_HEADER = "Retry-After"


class ClusterUnavailableForXid(CoordinatorUnavailable):
    """A call about a cluster-owned XID while the cluster is unreachable."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CoordinatorInvalidAnswer(SidecarError):
    """A coordinator (the cluster or a peer) answered 2xx without what the call needs."""

    code = "COORDINATOR_INVALID_ANSWER"
    status = 502


_T = TypeVar("_T")


async def _checked(call: Awaitable[_T], target: str | None) -> _T:
    """An answer that lacks a field (KeyError), or has one of the wrong shape, is the
    remote coordinator's fault: a clear 502, not an exception escaping into a task.
    (`target` None: the local engine, whose exceptions are bugs and stay as they are.)"""
    if target is None:
        return await call
    try:
        return await call
    except SidecarError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise CoordinatorInvalidAnswer(
            f"{target} answered without a usable {exc!s} in its JSON"
            if isinstance(exc, KeyError)
            else f"{target} answered with an unusable value: {exc}"
        ) from None


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
        self.max_peers = degraded.max_peers
        #: owner → client of the peer sidecar coordinating it (most recently used last)
        self._peers: OrderedDict[str, RemoteCoordinator] = OrderedDict()
        self._peer_session: aiohttp.ClientSession | None = None
        self.degraded = False
        #: how a peer's peer listener is reached: https when this sidecar's own terminates
        #: TLS (peers are configured alike), trusting coordinator.tls (set by server.py)
        self.peer_scheme = "http"
        self.peer_ssl: ssl.SSLContext | bool = True

    def set_peer_tls(self, context: ssl.SSLContext) -> None:
        """coordinator.tls's context (rotated files: new connections use the new one)."""
        self.peer_ssl = context
        for peer in self._peers.values():
            peer.ssl_context = context

    @property
    def own(self) -> str:
        return self.local.engine.owner

    async def open(self) -> None:
        await self.outbox.open()

    async def close(self) -> None:
        await self.outbox.close()
        self._peers.clear()
        if self._peer_session is not None:
            await self._peer_session.close()

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
        peer = self._peers.get(owner)
        if peer is not None:
            self._peers.move_to_end(owner)
            return peer
        if self._cluster_down():
            peer = self._admit(owner)
            if peer is not None:
                return peer
        return self.remote

    def _cluster_down(self) -> bool:
        return self.degraded or self.remote.breaker.state is not BreakerState.CLOSED

    def _owner(self, xid: str) -> str | None:
        try:
            return parse_xid(xid).owner
        except XidInvalid:
            return None

    def _admit(self, owner: str) -> RemoteCoordinator | None:
        """A client of the peer sidecar that owns an XID, if its address may be called:
        an IP address in degraded.peer_networks, on this sidecar's own peer port."""
        peer = self._peers.get(owner)
        if peer is not None:
            return peer
        # (refusals log at debug only: the owner is whatever a client wrote, one per request)
        host, _, port = owner.rpartition(":")
        if port != self.own.rpartition(":")[2]:
            log.debug("XID owner not on the peer port: not called", extra={"owner": owner[:128]})
            return None
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return None  # only addresses: a name could resolve anywhere
        if not any(address in net for net in self.networks):
            log.debug(
                "XID owner outside degraded.peer_networks: not called",
                extra={"owner": owner[:128]},
            )
            return None
        if self._peer_session is None:
            self._peer_session = aiohttp.ClientSession(
                # peers are IP addresses: no DNS cache (aiohttp's keeps an entry per host,
                # and every forged owner would be one)
                connector=aiohttp.TCPConnector(
                    limit=100, keepalive_timeout=30, use_dns_cache=False
                ),
                auto_decompress=False,
            )
        peer = RemoteCoordinator(
            replace(self.cfg, endpoints=[f"{self.peer_scheme}://{owner}"]),
            self.ring,
            self.metrics,
            session=self._peer_session,
        )
        peer.ssl_context = self.peer_ssl
        self._peers[owner] = peer
        while len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)  # the shared session keeps no state per client
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
            state = await _checked(
                self.remote.begin(name, timeout_ms, idempotency_key), "the coordinator cluster"
            )
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
            return await _checked(
                (target.commit if commit else target.rollback)(xid), self._name(target)
            )
        except CoordinatorUnavailable as exc:
            if target is not self.remote:
                raise
            # a cluster-owned decision the cluster cannot take now: journal it, re-send it
            # when it returns, and say the outcome is unknown meanwhile
            await self.outbox.record(xid, commit, exc.message)  # OutboxFull when at its cap
            raise DecisionPending(xid, commit, exc.message) from None

    async def status(self, xid: str) -> dict[str, Any]:
        target = self._for_xid(xid)
        return await _checked(target.status(xid), self._name(target))

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
        args = (xid, branch_type, resource_id, callback_url, application_data, idempotency_key)
        try:
            return await _checked(target.register(*args), self._name(target))
        except ClusterUnavailableForXid:
            raise
        except CoordinatorUnavailable as exc:
            if target is not self.remote:
                raise
            owner = self._owner(xid)
            peer = self._admit(owner) if owner is not None else None
            if peer is not None:
                # the cluster has just proved unreachable: degraded mode, and the XID's
                # owner is a peer this sidecar may call
                return await _checked(peer.register(*args), self._name(peer))
            raise ClusterUnavailableForXid(
                f"{exc.message} (degraded.remote_xid_policy: reject)",
                retry_after=max(1.0, self.remote.breaker.seconds_until_probe()),
            ) from None

    async def report(self, xid: str, branch_id: int, status: BranchStatus) -> None:
        target = self._for_xid(xid)
        await _checked(target.report(xid, branch_id, status), self._name(target))

    def _name(self, target: LocalCoordinator | RemoteCoordinator) -> str | None:
        if target is self.remote:
            return "the coordinator cluster"
        if not isinstance(target, RemoteCoordinator):
            return None
        return f"the peer sidecar at {target.endpoints[0]}"
