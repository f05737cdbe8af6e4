"""W3C trace context (sidecar/tracing.py), the log formatter's trace_id/xid, the access log's
sampling, the tracing/access-log config keys, and the spans of the no-exporter tracer."""

from __future__ import annotations

import logging

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar import config as configmod
from sidecar import spans, tracing
from sidecar.errors import ConfigError
from sidecar.logs import JsonFormatter
from sidecar.proxy.access_log import AccessLog
from sidecar.spans_otel import traces_url

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
hexes = st.text(alphabet="0123456789abcdef", min_size=1, max_size=1)


def test_parse_version_00() -> None:
    ctx = tracing.parse(f"00-{TRACE}-{SPAN}-01")
    assert ctx == tracing.TraceContext(TRACE, SPAN, True)
    assert ctx.traceparent == f"00-{TRACE}-{SPAN}-01"
    assert tracing.parse(f"00-{TRACE}-{SPAN}-00") == tracing.TraceContext(TRACE, SPAN, False)
    assert tracing.parse(f"00-{TRACE}-{SPAN}-01".encode()) == ctx


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        f"00-{TRACE}-{SPAN}",  # flags missing
        f"00-{TRACE.upper()}-{SPAN}-01",  # upper-case hex
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero span id
        f"ff-{TRACE}-{SPAN}-01",  # version ff is invalid
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE[:-1]}-{SPAN}-01",
        f"00-{TRACE}-{SPAN}-01".encode() + b"\xff",
        "x" * 1000,
    ],
)
def test_invalid_traceparents_are_ignored(value: str | bytes | None) -> None:
    assert tracing.parse(value) is None


def test_a_later_version_is_read_by_its_first_four_fields() -> None:
    assert tracing.parse(f"01-{TRACE}-{SPAN}-03-what-comes-later") == tracing.TraceContext(
        TRACE, SPAN, True
    )


@given(st.binary(min_size=16, max_size=16), st.binary(min_size=8, max_size=8), st.booleans())
def test_round_trip(trace: bytes, span: bytes, sampled: bool) -> None:
    ctx = tracing.TraceContext(trace.hex(), span.hex(), sampled)
    parsed = tracing.parse(ctx.traceparent)
    if trace == bytes(16) or span == bytes(8):
        assert parsed is None
    else:
        assert parsed == ctx


@given(st.text(max_size=80))
def test_parse_never_raises(value: str) -> None:
    tracing.parse(value)


def test_child_and_the_transaction_span() -> None:
    ctx = tracing.TraceContext(TRACE, SPAN, False)
    child = ctx.child()
    assert (child.trace_id, child.sampled) == (TRACE, False) and child.span_id != SPAN
    xid = "10.0.0.9:17020:42"
    assert tracing.transaction_span_id(xid) == tracing.transaction_span_id(xid)
    assert tracing.transaction_span_id(xid) != tracing.transaction_span_id(xid + "1")
    own = tracing.transaction_context(xid, ctx)
    assert own == tracing.TraceContext(TRACE, tracing.transaction_span_id(xid), False)


def test_from_headers() -> None:
    value = f"00-{TRACE}-{SPAN}-01".encode()
    assert tracing.from_headers([(b"x-a", b"1"), (b"TraceParent", value)]) == tracing.parse(value)
    assert tracing.from_headers([(b"x-a", b"1")]) is None
    assert tracing.from_headers(None) is None


def _format(msg: str, **extra: object) -> dict[str, object]:
    record = logging.LogRecord("sidecar.test", logging.INFO, __file__, 1, msg, None, None)
    record.__dict__.update(extra)
    return orjson.loads(JsonFormatter().format(record))  # type: ignore[no-any-return]


def test_log_lines_carry_the_trace_and_xid_of_what_is_handled() -> None:
    assert "trace_id" not in _format("outside")
    token = tracing.enter(tracing.TraceContext(TRACE, SPAN), "10.0.0.9:17020:1")
    try:
        line = _format("inside")
        assert line["trace_id"] == TRACE and line["xid"] == "10.0.0.9:17020:1"
        # a call site's own xid wins
        assert _format("inside", xid="10.0.0.9:17020:2")["xid"] == "10.0.0.9:17020:2"
    finally:
        tracing.leave(token)
    assert "xid" not in _format("after")


def test_about_leaves_the_callers_context_alone() -> None:
    seen: list[object] = []
    ctx = tracing.about(tracing.TraceContext(TRACE, SPAN), "a:1:1")
    ctx.run(lambda: seen.append(tracing.current()))
    assert seen == [(tracing.TraceContext(TRACE, SPAN), "a:1:1")]
    assert tracing.current() == (None, None)


class _Fake:
    """What the access log reads of an exchange."""

    def __init__(self) -> None:
        from sidecar.proxy.headers import RequestHead

        self.head = RequestHead(method=b"GET", url=b"/x", headers=[])
        self.rt = type("Rt", (), {"name": "inbound"})()
        self.cluster = None
        self.resp_status = 200
        self.body_buffered = 0
        self.resp_bytes = 3
        self.xid = None
        self.txn = None
        self.error_code = None


def test_access_log_sampling(caplog: pytest.LogCaptureFixture) -> None:
    draws = iter([0.05, 0.5, 0.09, 0.95])
    log = AccessLog(0.1, rand=lambda: next(draws))
    with caplog.at_level(logging.INFO, logger="sidecar.access"):
        for _ in range(4):
            log.write(_Fake(), 0.001)  # type: ignore[arg-type]
    assert len([r for r in caplog.records if r.name == "sidecar.access"]) == 2


def test_config_keys() -> None:
    cfg = configmod.parse(
        {
            "tracing": {"otlp_endpoint": "http://otel:4318", "sample_ratio": 0.25},
            "logging": {"access_log": {"enabled": True, "sample_ratio": 0.5}},
        },
        env={},
    )
    assert cfg.tracing.otlp_endpoint == "http://otel:4318"
    assert cfg.logging.access_log.sample_ratio == 0.5
    defaults = configmod.parse({}, env={})
    assert defaults.tracing.otlp_endpoint is None and not defaults.logging.access_log.enabled
    for bad, path in [
        ({"tracing": {"sample_ratio": 1.5}}, "tracing.sample_ratio"),
        ({"tracing": {"otlp_endpoint": "grpc://otel:4317"}}, "tracing.otlp_endpoint"),
        ({"tracing": {"exporter": "zipkin"}}, "tracing.exporter"),
        ({"logging": {"access_log": {"sample_ratio": 0}}}, "logging.access_log.sample_ratio"),
    ]:
        with pytest.raises(ConfigError) as info:
            configmod.parse(bad, env={})
        assert path in str(info.value)


def test_traces_url() -> None:
    assert traces_url("http://otel:4318") == "http://otel:4318/v1/traces"
    assert traces_url("http://otel:4318/") == "http://otel:4318/v1/traces"
    assert traces_url("http://otel:4318/custom/traces") == "http://otel:4318/custom/traces"


def test_the_ids_tracer_continues_the_parent_trace() -> None:
    tracer = spans.IdsTracer()
    parent = tracing.TraceContext(TRACE, SPAN, False)
    span = tracer.start("x", parent)
    assert span.context.trace_id == TRACE and not span.context.sampled
    assert span.context.span_id != SPAN
    root = tracer.start("y", None, span_id=SPAN, trace_id=TRACE)
    assert root.context == tracing.TraceContext(TRACE, SPAN, True)


def test_the_sdk_is_imported_only_when_spans_are_exported() -> None:
    import subprocess
    import sys

    code = (
        "import sys, sidecar.server, sidecar.standalone, sidecar.spans; "
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_missing_sdk_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.delitem(sys.modules, "sidecar.spans_otel", raising=False)
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    cfg = configmod.parse({"tracing": {"otlp_endpoint": "http://otel:4318"}}, env={})
    with pytest.raises(ConfigError) as info:
        spans.configure(cfg.tracing, "sidecar")
    assert "tracing.otlp_endpoint" in str(info.value)
    assert "opentelemetry-sdk" in str(info.value)
    assert isinstance(spans.tracer(), spans.IdsTracer)
