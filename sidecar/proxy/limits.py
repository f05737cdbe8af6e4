"""A proxy listener's and an upstream's limits as plain attributes, copied once per config
version from config's frozen models.

Why copies: the request path reads these on every request and every header field. When the
config's models were pydantic's, each read went through the class's `__getattr__` hook (two
type lookups before the instance dict): about 370 instructions a read against a few for these
classes, whose attributes mypyc compiles to struct fields (setup.py compiles this module with
the request path); fourteen such reads per request were 8% of the compiled build's work. The
models are slotted dataclasses now (sidecar/schema.py), cheaper to read but still a generic
attribute lookup from compiled code, where these are struct fields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.config import ClientLimits, HeaderLimits, ProxyListenerTimeouts


class HeadLimits:
    """The size limits of a request head (a listener's `limits`) or a response head (an
    upstream's `response_limits`), in bytes and fields."""

    request_line: int
    header_field: int
    header_count: int
    header_bytes: int

    def __init__(self, cfg: HeaderLimits) -> None:
        self.request_line = cfg.request_line
        self.header_field = cfg.header_field
        self.header_count = cfg.header_count
        self.header_bytes = cfg.header_bytes


class ClientPolicy:
    """What a proxy listener grants each client (its `clients` section)."""

    max_connections: int
    max_connections_per_client: int
    request_buffer: int
    min_rate_bytes: int
    min_rate_window: float
    max_concurrent_streams: int

    def __init__(self, cfg: ClientLimits) -> None:
        self.max_connections = cfg.max_connections
        self.max_connections_per_client = cfg.max_connections_per_client
        self.request_buffer = cfg.request_buffer
        self.min_rate_bytes = cfg.min_rate_bytes
        self.min_rate_window = cfg.min_rate_window
        self.max_concurrent_streams = cfg.max_concurrent_streams


class ListenerTimeouts:
    """A proxy listener's client-side timeouts (its `timeouts` section), in seconds."""

    header_read: float
    body_idle: float
    keepalive: float

    def __init__(self, cfg: ProxyListenerTimeouts) -> None:
        self.header_read = cfg.header_read
        self.body_idle = cfg.body_idle
        self.keepalive = cfg.keepalive
