"""Spans: the calls made for a transaction, as a trace's spans (exported over OTLP/HTTP when
`tracing.otlp_endpoint` is set).

Process-wide, like logging: configured once at start (`configure`), used where a span begins.
Without an endpoint nothing is imported from OpenTelemetry and a span is two ids: the calls
still carry a `traceparent` (a child of the trace they belong to), nothing is recorded.
With one, `sidecar.spans_otel` builds the SDK's tracer provider (batch export, sampling by
`tracing.sample_ratio` for new traces, the caller's decision otherwise).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal, Protocol

from sidecar.tracing import TraceContext, new_span_id, new_trace_id

if TYPE_CHECKING:
    from sidecar.config import TracingConfig

log = logging.getLogger("sidecar.tracing")

Kind = Literal["client", "server", "internal"]
Attributes = dict[str, str | int | bool]


class Span(Protocol):
    #: this span's position: the parent of the calls it makes (their `traceparent`)
    context: TraceContext

    def end(self, error: str | None = None, end_ns: int | None = None) -> None: ...


class Tracer(Protocol):
    def start(
        self,
        name: str,
        parent: TraceContext | None,
        *,
        kind: Kind = "internal",
        attributes: Attributes | None = None,
        span_id: str | None = None,
        trace_id: str | None = None,
        start_ns: int | None = None,
    ) -> Span: ...

    def shutdown(self) -> None: ...


class _IdsOnly:
    """A span that is only its ids (no exporter configured)."""

    __slots__ = ("context",)

    def __init__(self, context: TraceContext) -> None:
        self.context = context

    def end(self, error: str | None = None, end_ns: int | None = None) -> None:
        pass


class IdsTracer:
    """The tracer without an exporter: new span ids in the caller's trace, nothing kept."""

    def start(
        self,
        name: str,
        parent: TraceContext | None,
        *,
        kind: Kind = "internal",
        attributes: Attributes | None = None,
        span_id: str | None = None,
        trace_id: str | None = None,
        start_ns: int | None = None,
    ) -> Span:
        if parent is not None:
            trace, sampled = parent.trace_id, parent.sampled
        else:
            trace, sampled = trace_id or new_trace_id(), True
        return _IdsOnly(TraceContext(trace, span_id or new_span_id(), sampled))

    def shutdown(self) -> None:
        pass


_tracer: Tracer = IdsTracer()


def tracer() -> Tracer:
    return _tracer


def recording() -> bool:
    """Spans are exported: worth building one that no call's traceparent needs."""
    return not isinstance(_tracer, IdsTracer)


def configure(cfg: TracingConfig, role: str) -> bool:
    """Export spans as the tracing section says (at start; a change needs a restart).
    True when this call set up an exporter, which `shutdown` then flushes and stops; without
    an endpoint nothing changes (sidecars that share a test process keep one exporter)."""
    global _tracer
    if cfg.otlp_endpoint is None:
        return False
    # imported only here: a sidecar that exports no spans never loads the SDK
    from sidecar.spans_otel import OtelTracer

    old, _tracer = _tracer, OtelTracer(cfg.otlp_endpoint, cfg.sample_ratio, role)
    old.shutdown()
    log.info(
        "exporting spans over OTLP/HTTP",
        extra={"endpoint": cfg.otlp_endpoint, "sample_ratio": cfg.sample_ratio},
    )
    return True


def shutdown() -> None:
    """Flush and stop the exporter (at stop: spans still queued are sent, within the
    exporter's timeout). Blocking: call it in a thread."""
    global _tracer
    old, _tracer = _tracer, IdsTracer()
    old.shutdown()
