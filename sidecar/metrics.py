"""Every Prometheus object the sidecar exports, in one place, all prefixed `gts_sidecar_`.

Objects live in a registry of their own (not the process-global default), so tests and an
embedded coordinator can build as many as they like. Hot-path users pre-bind label children
once instead of calling `.labels()` per request, and request counts are plain integers
read at scrape time (`ProxyStats`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from sidecar.request_stats import REQUEST_BUCKETS as _BUCKETS
from sidecar.request_stats import RequestStats

# a global transaction, begin to final: a confirm round trip up to its timeout and beyond
_TX_BUCKETS = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
    *(2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0),
)


class ProxyStats(Collector):
    """The proxy listeners' request counters, exported as
    gts_sidecar_requests_total{listener,upstream,status} and
    gts_sidecar_request_duration_seconds{listener,upstream}."""

    def __init__(self) -> None:
        self._stats: dict[tuple[str, str], RequestStats] = {}

    def stats(self, listener: str, upstream: str) -> RequestStats:
        key = (listener, upstream)
        st = self._stats.get(key)
        if st is None:
            st = self._stats[key] = RequestStats()
        return st

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "gts_sidecar_requests",
            "Requests answered by the proxy listeners",
            labels=["listener", "upstream", "status"],
        )
        durations = HistogramMetricFamily(
            "gts_sidecar_request_duration_seconds",
            "Time from request head received to response end, per listener and upstream",
            labels=["listener", "upstream"],
        )
        bounds = [*map(str, _BUCKETS), "+Inf"]
        for (listener, upstream), st in list(self._stats.items()):
            for status, n in sorted(st.by_status.items()):
                requests.add_metric([listener, upstream, str(status)], n)
            cumulative, acc = [], 0
            for bound, n in zip(bounds, st.buckets, strict=True):
                acc += n
                cumulative.append((bound, float(acc)))
            durations.add_metric([listener, upstream], cumulative, st.total_seconds)
        yield requests
        yield durations

    def describe(self) -> Iterator[Metric]:
        return iter(())


class Pool(Protocol):
    name: str

    @property
    def in_use(self) -> int: ...
    @property
    def idle_count(self) -> int: ...
    @property
    def waiting(self) -> int: ...


class PoolStats(Collector):
    """gts_sidecar_pool_connections_{in_use,idle} and gts_sidecar_pool_requests_waiting per
    upstream, summed over the clusters alive (a reload can leave a retired one draining)."""

    def __init__(self) -> None:
        self._pools: weakref.WeakSet[Any] = weakref.WeakSet()

    def add(self, pool: Pool) -> None:
        self._pools.add(pool)

    def collect(self) -> Iterator[Metric]:
        families = {
            "in_use": GaugeMetricFamily(
                "gts_sidecar_pool_connections_in_use",
                "Upstream connections carrying a request",
                labels=["upstream"],
            ),
            "idle": GaugeMetricFamily(
                "gts_sidecar_pool_connections_idle",
                "Upstream keep-alive connections waiting for a request",
                labels=["upstream"],
            ),
            "waiting": GaugeMetricFamily(
                "gts_sidecar_pool_requests_waiting",
                "Requests waiting for an upstream connection",
                labels=["upstream"],
            ),
        }
        sums: dict[str, list[int]] = {}
        for pool in list(self._pools):
            acc = sums.setdefault(pool.name, [0, 0, 0])
            acc[0] += pool.in_use
            acc[1] += pool.idle_count
            acc[2] += pool.waiting
        for name, (in_use, idle, waiting) in sorted(sums.items()):
            families["in_use"].add_metric([name], in_use)
            families["idle"].add_metric([name], idle)
            families["waiting"].add_metric([name], waiting)
        yield from families.values()

    def describe(self) -> Iterator[Metric]:
        return iter(())


class FileSizes(Collector):
    """gts_sidecar_journal_bytes{file}: bytes on disk of the journal and the small files
    beside it (locks, outbox, fence), read at scrape time (a stat per file)."""

    def __init__(self) -> None:
        self._files: dict[str, Callable[[], int]] = {}

    def add(self, name: str, size: Callable[[], int]) -> None:
        """`name` is a fixed word (journal, locks, outbox, fence): a bounded label."""
        self._files[name] = size

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "gts_sidecar_journal_bytes",
            "Bytes on disk of the journal's files (database and WAL), by file",
            labels=["file"],
        )
        for name, size in sorted(self._files.items()):
            try:
                family.add_metric([name], size())
            except OSError:
                continue  # a file being replaced: absent from this scrape
        yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())


#: process_* (CPU, memory, fds), python_info and python_gc_*: one of each per process, shared
#: by every registry (the GC collector hooks gc.callbacks once; one per Metrics would pile up)
_STANDARD: tuple[Collector, ...] = (
    ProcessCollector(registry=None),
    PlatformCollector(registry=None),
    GCCollector(registry=CollectorRegistry()),  # it insists on registering somewhere
)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.build_info = Info("gts_sidecar_build", "Version of the running sidecar", registry=r)
        #: requests and their durations: counted in plain ints on the hot path and turned
        #: into metric families only when scraped (prometheus-client's own objects take a
        #: lock per update)
        self.proxy = ProxyStats()
        r.register(self.proxy)
        self.xid_rejections = Counter(
            "gts_sidecar_xid_rejections",
            "Requests refused because of their XID header(s), by reason",
            ["listener", "reason"],
            registry=r,
        )
        self.upstream_timeouts = Counter(
            "gts_sidecar_upstream_timeouts",
            "Upstream timeouts by kind (connect, response_header, total)",
            ["listener", "upstream", "kind"],
            registry=r,
        )
        self.upstream_retries = Counter(
            "gts_sidecar_upstream_retries",
            "Retried upstream attempts (idempotent requests that cannot have reached it)",
            ["upstream"],
            registry=r,
        )
        #: pool gauges, read from the live clusters at scrape time
        self.pools = PoolStats()
        r.register(self.pools)
        self.pool_exhausted = Counter(
            "gts_sidecar_pool_exhausted",
            "Requests refused at once because the pool and its pending queue were full",
            ["upstream"],
            registry=r,
        )
        self.client_errors = Counter(
            "gts_sidecar_client_errors",
            "Client connections cut off or refused by the listener, by reason",
            ["listener", "reason"],
            registry=r,
        )
        self.client_aborts = Counter(
            "gts_sidecar_client_aborts",
            "Exchanges abandoned because the client went away (FIN or RST) before its answer "
            "was complete: the upstream request was aborted",
            ["listener"],
            registry=r,
        )
        self.http2_connections = Counter(
            "gts_sidecar_http2_connections",
            "Client connections that spoke HTTP/2 (prior knowledge or ALPN h2), by listener",
            ["listener"],
            registry=r,
        )
        self.http2_streams = Counter(
            "gts_sidecar_http2_streams",
            "HTTP/2 streams (requests) from clients, by listener; they are also counted in "
            "the request metrics like HTTP/1.1 requests",
            ["listener"],
            registry=r,
        )
        self.grpc_calls = Counter(
            "gts_sidecar_grpc_calls",
            "gRPC calls answered to clients, by listener, upstream and grpc-status (a failed "
            "call is HTTP 200 in gts_sidecar_requests_total): 0-16, other, or missing",
            ["listener", "upstream", "grpc_status"],
            registry=r,
        )
        self.active_connections = Gauge(
            "gts_sidecar_downstream_connections",
            "Open client connections per listener",
            ["listener"],
            registry=r,
        )
        self.config_reloads = Counter(
            "gts_sidecar_config_reloads",
            "Config reload attempts by result (applied, invalid, unchanged)",
            ["result"],
            registry=r,
        )
        self.tls_handshake_failures = Counter(
            "gts_sidecar_tls_handshake_failures",
            "TLS handshakes a listener refused or that never finished, by reason (sidecar/tls.py)",
            ["listener", "reason"],
            registry=r,
        )
        self.tls_reloads = Counter(
            "gts_sidecar_tls_reloads",
            "Certificate and key files re-read after a change, by result (applied, invalid)",
            ["result"],
            registry=r,
        )
        self.tls_certificate_expiry = Gauge(
            "gts_sidecar_tls_certificate_expiry_timestamp_seconds",
            "When each certificate this process presents expires (listener:NAME, app, "
            "upstream:NAME, coordinator), seconds since the epoch",
            ["name"],
            registry=r,
        )
        #: renamed from gts_sidecar_config_version (an info metric ends in _info)
        self.config_info = Gauge(
            "gts_sidecar_config_info",
            "1 for the config version in force (sha256 prefix of the file)",
            ["sha256"],
            registry=r,
        )
        self.signature_failures = Counter(
            "gts_sidecar_signature_failures",
            "Signed requests refused, by reason (unknown_key, stale, mismatch, replay, malformed)",
            ["reason"],
            registry=r,
        )
        self.transactions = Counter(
            "gts_sidecar_transactions",
            "Global transactions finished by this process's coordinator, by outcome",
            ["coordinator", "status"],
            registry=r,
        )
        self.transactions_active = Gauge(
            "gts_sidecar_transactions_active",
            "Unfinished global transactions held by this process's coordinator",
            ["coordinator"],
            registry=r,
        )
        self.phase_two_calls = Counter(
            "gts_sidecar_phase_two_calls",
            "Phase-two callbacks made to branches, by result (ok, failed)",
            ["result"],
            registry=r,
        )
        self.branches_stuck = Counter(
            "gts_sidecar_branches_stuck",
            "Branches whose phase two gave up after max_attempts (need an operator)",
            registry=r,
        )
        self.declarative = Counter(
            "gts_sidecar_declarative_transactions",
            "Transactions begun by inbound rules, by outcome (Committed, Rollbacked, …)",
            ["name", "status"],
            registry=r,
        )
        self.coordinator_calls = Counter(
            "gts_sidecar_coordinator_calls",
            "Calls to the coordinator cluster, by call and result",
            ["call", "result"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "gts_sidecar_coordinator_breaker_open",
            "1 while the circuit breaker to the coordinator cluster is open or half open",
            registry=r,
        )
        self.degraded = Gauge(
            "gts_sidecar_degraded",
            "1 while new transactions are coordinated locally because the cluster is unreachable",
            registry=r,
        )
        self.degraded_begins = Counter(
            "gts_sidecar_degraded_begins",
            "Transactions begun by the local coordinator because the cluster was unreachable",
            registry=r,
        )
        self.ready = Gauge("gts_sidecar_ready", "1 when /readyz answers 200", registry=r)
        self.transaction_duration = Histogram(
            "gts_sidecar_transaction_duration_seconds",
            "Global transactions of this process's coordinator, begin to final status, by "
            "outcome (Committed, Rollbacked, TimeoutRollbacked)",
            ["outcome"],
            buckets=_TX_BUCKETS,
            registry=r,
        )
        self.phase_two_duration = Histogram(
            "gts_sidecar_phase_two_duration_seconds",
            "Phase-two callbacks to branches, sent to answered (or failed), by phase (commit, "
            "rollback)",
            ["phase"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.stuck_branches = Gauge(
            "gts_sidecar_stuck_branches",
            "Branches stuck now: phase two gave up and waits for an operator (retry or skip)",
            registry=r,
        )
        # the standard process_* and python_* series, on this registry (not the global one)
        for collector in _STANDARD:
            r.register(collector)
        self.outbox_depth = Gauge(
            "gts_sidecar_outbox_depth",
            "Decisions for the coordinator cluster kept undelivered in the outbox (pending "
            "and stuck), capped by local_coordinator.outbox_max_items",
            registry=r,
        )
        self.outbox_refused = Counter(
            "gts_sidecar_outbox_refused",
            "Decisions answered 503 OUTBOX_FULL because the outbox was at its cap",
            registry=r,
        )
        #: file sizes, stat'ed at scrape time
        self.journal_files = FileSizes()
        r.register(self.journal_files)
        self.compacted = Counter(
            "gts_sidecar_compacted_rows",
            "Rows removed by retention, by file (journal: transactions; locks, outbox, fence)",
            ["file"],
            registry=r,
        )
        # replicas of `gts-sidecar coordinator` on PostgreSQL (pg_lease.py)
        self.replica_lease = Gauge(
            "gts_sidecar_replica_lease_held",
            "Replicated coordinator: 1 while this replica's lease is renewed in time, 0 while "
            "it cannot renew (database unreachable) or has lost it to another replica",
            registry=r,
        )
        self.replica_takeovers = Counter(
            "gts_sidecar_replica_takeovers",
            "Replicated coordinator: transactions this replica took over, by how: expired "
            "(another replica's lease ran out) or adopted (asked here about a Begin "
            "transaction another replica drove)",
            ["how"],
            registry=r,
        )
