"""The access log: one JSON line per proxied request (logger `sidecar.access`, at info).

Fields: listener, method, path, status, duration_ms, upstream, bytes_in (the request body's
declared length, else what was read of it before forwarding), bytes_out (response body bytes
from the upstream), xid, trace_id (from the request's `traceparent`), error (the sidecar's
error code, when it answered itself). `logging.access_log.sample_ratio` logs that share of
requests, chosen at random.

Off (the default) it costs one module attribute read per request: the exchange calls
`writer.write` only when `writer` is set, and nothing of the line is built.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from sidecar.tracing import from_headers

if TYPE_CHECKING:
    from sidecar.config import AccessLogConfig
    from sidecar.proxy.exchange import Exchange

log = logging.getLogger("sidecar.access")


class AccessLog:
    def __init__(self, ratio: float, rand: Callable[[], float] = random.random) -> None:
        self.ratio = ratio
        self._rand = rand

    def write(self, ex: Exchange, elapsed: float) -> None:
        if self.ratio < 1.0 and self._rand() >= self.ratio:
            return
        head = ex.head
        trace = from_headers(head.headers)
        length = head.content_length
        log.info(
            "access",
            extra={
                "listener": ex.rt.name,
                "method": head.method.decode("latin-1"),
                "path": head.url[:1024].decode("latin-1"),
                "status": ex.resp_status,
                "duration_ms": round(elapsed * 1000, 3),
                "upstream": ex.cluster.name if ex.cluster is not None else None,
                "bytes_in": int(length) if length is not None else ex.body_buffered,
                "bytes_out": ex.resp_bytes,
                "xid": _xid(ex),
                "trace_id": trace.trace_id if trace is not None else None,
                "error": ex.error_code,
            },
        )


def _xid(ex: Exchange) -> str | None:
    if ex.xid is not None:
        return ex.xid.raw
    txn = ex.txn  # a transaction the request began
    return txn.xid if txn is not None else None


#: the access log in force, or None (off): read by the exchange at the end of each request
writer: AccessLog | None = None


def configure(cfg: AccessLogConfig) -> None:
    """At start and on every reload (the next requests use the new setting)."""
    global writer
    if cfg.enabled:
        # its own level: the lines are written whatever logging.level says
        log.setLevel(logging.INFO)
        writer = AccessLog(cfg.sample_ratio)
    else:
        writer = None
