"""The OpenTelemetry SDK behind `sidecar.spans`: a tracer provider of its own (never the
global one), batch export over OTLP/HTTP (protobuf), parent-based sampling.

Imported only when `tracing.otlp_endpoint` is configured. Two things the SDK's API does not
offer directly are done here: a span that continues a context received as a string (the
stored `traceparent`) and a span whose id is chosen by the caller (the transaction's own
span, whose id is derived from its XID so that it is the same after a restart). The id
generator hands out the chosen id while that one span is started; the event loop starts
spans one at a time, so nothing else can take it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from sidecar.errors import ConfigError
from sidecar.tracing import TraceContext

if TYPE_CHECKING:
    from sidecar.spans import Attributes, Kind, Span

try:
    from opentelemetry import trace as api
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace import Status, StatusCode
except ImportError as exc:  # pragma: no cover - the packages are dependencies
    raise ConfigError(
        [
            "tracing.otlp_endpoint: set, but the OpenTelemetry SDK cannot be imported "
            f"({exc}); install opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http"
        ]
    ) from None

#: spans wait at most this long in the batch before they are sent
_SCHEDULE_MS: Final = 500
#: one export request (and the flush at stop) gives up after this long
_EXPORT_TIMEOUT_S: Final = 5.0
_KINDS: Final = {
    "client": api.SpanKind.CLIENT,
    "server": api.SpanKind.SERVER,
    "internal": api.SpanKind.INTERNAL,
}


def traces_url(endpoint: str) -> str:
    """`http://collector:4318` means its `/v1/traces` (as OTEL_EXPORTER_OTLP_ENDPOINT);
    a URL with a path is used as it is (as OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)."""
    if urlsplit(endpoint).path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


class _ChosenIds(RandomIdGenerator):
    def __init__(self) -> None:
        self.span_id: int | None = None
        self.trace_id: int | None = None

    def generate_span_id(self) -> int:
        if self.span_id is not None:
            return self.span_id
        return super().generate_span_id()

    def generate_trace_id(self) -> int:
        if self.trace_id is not None:
            return self.trace_id
        return super().generate_trace_id()


class _OtelSpan:
    __slots__ = ("context", "_span")

    def __init__(self, span: Any) -> None:
        self._span = span
        ctx = span.get_span_context()
        self.context = TraceContext(
            format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"), ctx.trace_flags.sampled
        )

    def end(self, error: str | None = None, end_ns: int | None = None) -> None:
        if error is not None:
            self._span.set_status(Status(StatusCode.ERROR, error[:500]))
        self._span.end(end_time=end_ns)


class OtelTracer:
    def __init__(self, endpoint: str, sample_ratio: float, role: str) -> None:
        self._ids = _ChosenIds()
        self._ids_lock = threading.Lock()
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": "gts-sidecar", "gts.role": role}),
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
            id_generator=self._ids,
        )
        exporter = OTLPSpanExporter(endpoint=traces_url(endpoint), timeout=_EXPORT_TIMEOUT_S)
        self._provider.add_span_processor(
            BatchSpanProcessor(
                exporter,
                schedule_delay_millis=_SCHEDULE_MS,
                export_timeout_millis=_EXPORT_TIMEOUT_S * 1000,
            )
        )
        self._tracer = self._provider.get_tracer("gts-sidecar")

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
        context = None
        if parent is not None:
            context = api.set_span_in_context(
                api.NonRecordingSpan(
                    api.SpanContext(
                        trace_id=int(parent.trace_id, 16),
                        span_id=int(parent.span_id, 16),
                        is_remote=True,
                        trace_flags=api.TraceFlags(
                            api.TraceFlags.SAMPLED if parent.sampled else api.TraceFlags.DEFAULT
                        ),
                    )
                )
            )
        with self._ids_lock:
            self._ids.span_id = None if span_id is None else int(span_id, 16)
            self._ids.trace_id = None if trace_id is None else int(trace_id, 16)
            try:
                span = self._tracer.start_span(
                    name, context, _KINDS[kind], attributes, start_time=start_ns
                )
            finally:
                self._ids.span_id = self._ids.trace_id = None
        return _OtelSpan(span)

    def shutdown(self) -> None:
        self._provider.shutdown()
