"""Phase-two callbacks: the coordinator calling a branch's sidecar, signed.

`POST {callbackUrl}/commit` or `/rollback` with `{xid, branchId, resourceId, applicationData}`,
headers `XID` and an `Idempotency-Key` stable for (xid, branch, phase). The branch answers
`{status: PhaseTwo_Committed | PhaseTwo_Rollbacked}` with a 2xx when done; anything else
(`…_Retryable`, another status, an error, a timeout) means "retry later".

The calls go over the data plane's keep-alive pools (`sidecar.proxy.fetch`), one pool per
callback origin: a degraded sidecar makes one per branch per transaction, and an aiohttp
client request costs several times as much CPU.
"""

from __future__ import annotations

import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

import orjson

from sidecar.config import ClusterConfig, PoolConfig, RetryConfig, UpstreamTimeouts
from sidecar.coordinator import protocol
from sidecar.coordinator.records import BranchRecord
from sidecar.coordinator.signing import KeyRing, sign_headers
from sidecar.errors import SidecarError
from sidecar.proxy.fetch import fetch
from sidecar.proxy.upstream import Cluster
from sidecar.schema import construct
from sidecar.spans import tracer
from sidecar.tracing import current_trace

if TYPE_CHECKING:
    from sidecar.metrics import Metrics

#: callback origins (scheme://host:port) with a pool each; past it the oldest pool closes
_MAX_ORIGINS: Final = 256
#: callback URLs remembered with their pool and path (parsed once each)
_MAX_TARGETS: Final = 4096
#: a callback's answer is a small JSON object
_MAX_ANSWER: Final = 64 * 1024
#: the `upstream` label of every callback pool's metrics: one fixed name, never the
#: target's address (1,000 participant addresses made 2,000 series when it was)
POOL_LABEL: Final = "phase_two_callbacks"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def idempotency_key(xid: str, branch_id: int, phase: str) -> str:
    return f"{xid}:{branch_id}:{phase}"


class HttpBranchCaller:
    def __init__(
        self,
        ring: KeyRing,
        *,
        timeout: float,
        connect_timeout: float,
        metrics: Metrics,
        clock_ms: Callable[[], int] = _now_ms,
    ) -> None:
        self.ring = ring
        self.timeout = timeout
        self.connect_timeout = min(connect_timeout, timeout)
        self.metrics = metrics
        self._clock_ms = clock_ms
        self._clusters: OrderedDict[str, Cluster] = OrderedDict()
        self._targets: dict[str, tuple[Cluster, str, str]] = {}
        #: gts_sidecar_phase_two_duration_seconds children, bound once: by commit
        self._durations = {
            commit: metrics.phase_two_duration.labels("commit" if commit else "rollback")
            for commit in (True, False)
        }
        #: https:// callback URLs: coordinator.tls (sidecar/tls.py); None: the system's CAs
        self._ssl: ssl.SSLContext | None = None
        self._server_name: str | None = None

    def set_tls(self, context: ssl.SSLContext | None, server_name: str | None) -> None:
        """The TLS of https:// callbacks from now on (rotated files: new connections)."""
        self._ssl, self._server_name = context, server_name
        for origin, cluster in self._clusters.items():
            if origin.startswith("https://") and context is not None:
                cluster.ssl = context
                cluster.server_name = server_name

    async def close(self) -> None:
        for cluster in self._clusters.values():
            cluster.close()
        self._clusters.clear()
        self._targets.clear()

    def _target(self, url: str) -> tuple[Cluster, str, str]:
        """(pool, path, query) of a callback URL, parsed once."""
        found = self._targets.get(url)
        if found is not None and not found[0].closed:
            return found
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        cluster = self._clusters.get(origin)
        if cluster is None:
            cluster = self._clusters[origin] = self._new_cluster(origin)
            if len(self._clusters) > _MAX_ORIGINS:
                _, oldest = self._clusters.popitem(last=False)
                oldest.close()
        if len(self._targets) >= _MAX_TARGETS:
            self._targets.clear()
        found = self._targets[url] = (cluster, parts.path or "/", parts.query)
        return found

    def _new_cluster(self, origin: str) -> Cluster:
        # built, not parsed: these values are ours (the config checked the timeouts)
        cfg = construct(
            ClusterConfig,
            url=origin,
            timeouts=construct(
                UpstreamTimeouts,
                connect=self.connect_timeout,
                response_header=self.timeout,
                total=self.timeout,  # fetch() times the whole call
            ),
            pool=construct(
                PoolConfig, max_connections=256, max_idle=64, idle_timeout=30.0, max_pending=4096
            ),
            retries=construct(RetryConfig, attempts=0, budget_ratio=0.0),
        )
        return Cluster(
            POOL_LABEL, cfg, self.metrics, ssl_context=self._ssl, server_name=self._server_name
        )

    async def phase_two(self, branch: BranchRecord, commit: bool) -> str | None:
        suffix = protocol.COMMIT_SUFFIX if commit else protocol.ROLLBACK_SUFFIX
        phase = "commit" if commit else "rollback"
        url = branch.callback_url + suffix
        body = protocol.callback_body(branch)
        key = idempotency_key(branch.xid, branch.branch_id, phase)
        try:
            cluster, raw_path, raw_query = self._target(url)
        except ValueError as exc:  # registration validated it: a journal from elsewhere
            return f"{phase} callback to {url}: not a usable URL ({exc})"
        signed = sign_headers(
            self.ring, "POST", raw_path, raw_query, body,
            now_ms=self._clock_ms(), idempotency_key=key, xid=branch.xid,
        )  # fmt: skip
        # a span per call, child of the transaction's own span (the engine's phase-two task
        # is about the transaction); the branch's sidecar gets its position as traceparent
        span = tracer().start(
            f"gts phase two {phase}",
            current_trace(),
            kind="client",
            attributes={
                "gts.xid": branch.xid,
                "gts.branch_id": str(branch.branch_id),
                "gts.resource_id": branch.resource_id,
                "gts.attempt": branch.attempts + 1,
            },
        )
        headers = [
            *signed.items(),
            ("content-type", "application/json"),
            ("xid", branch.xid),
            ("idempotency-key", key),
            ("traceparent", span.context.traceparent),
        ]
        target = f"{raw_path}?{raw_query}" if raw_query else raw_path
        started = time.perf_counter()
        error: str | None = "cancelled"
        try:
            try:
                response = await fetch(
                    cluster, "POST", target, headers, body,
                    timeout=self.timeout, idempotent=True, max_body=_MAX_ANSWER,
                )  # fmt: skip
            except SidecarError as exc:
                error = f"{phase} callback to {url} failed: {exc.message}"
                return error
            finally:
                self._durations[commit].observe(time.perf_counter() - started)
            want = "PhaseTwo_Committed" if commit else "PhaseTwo_Rollbacked"
            try:
                answer = orjson.loads(response.body).get("status") if response.body else None
            except (orjson.JSONDecodeError, AttributeError):
                answer = None
            if 200 <= response.status < 300 and answer == want:
                error = None
                return None
            error = f"{phase} callback to {url}: HTTP {response.status}, status {answer!r}"
            return error
        finally:
            span.end(error)
