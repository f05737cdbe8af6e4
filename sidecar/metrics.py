"""Every Prometheus object the sidecar exports, in one place, all prefixed `gts_sidecar_`.

Objects live in a registry of their own (not the process-global default), so tests and an
embedded coordinator can build as many as they like. Hot-path users pre-bind label children
once (see `ProxyMetrics`) instead of calling `.labels()` per request.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.build_info = Info("gts_sidecar_build", "Version of the running sidecar", registry=r)
        self.requests = Counter(
            "gts_sidecar_requests",
            "Requests answered by the proxy listeners",
            ["listener", "upstream", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "gts_sidecar_request_duration_seconds",
            "Time from request head received to response end, per listener and upstream",
            ["listener", "upstream"],
            buckets=_BUCKETS,
            registry=r,
        )
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
        self.pool_in_use = Gauge(
            "gts_sidecar_pool_connections_in_use",
            "Upstream connections carrying a request",
            ["upstream"],
            registry=r,
        )
        self.pool_idle = Gauge(
            "gts_sidecar_pool_connections_idle",
            "Upstream keep-alive connections waiting for a request",
            ["upstream"],
            registry=r,
        )
        self.pool_waiting = Gauge(
            "gts_sidecar_pool_requests_waiting",
            "Requests waiting for an upstream connection",
            ["upstream"],
            registry=r,
        )
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
        self.config_info = Gauge(
            "gts_sidecar_config_version",
            "1 for the config version in force (sha256 prefix of the file)",
            ["sha256"],
            registry=r,
        )
        self.ready = Gauge("gts_sidecar_ready", "1 when /readyz answers 200", registry=r)
