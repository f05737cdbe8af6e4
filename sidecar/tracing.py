"""W3C trace context (`traceparent`): parse, format, new ids, and what a log line is about.

Rules: pure apart from random ids and one context variable; no I/O. A transaction belongs to
the trace of the request that began it: the coordinator stores the begin call's
`traceparent` with the transaction, and every later call made for it (phase two, after a
restart too) carries a child of that context. The transaction's own span has an id derived
from its XID, so it is the same span in every process and after every restart without
storing a second id.

Parsing follows the W3C Trace Context recommendation (level 1): version 00 is exactly
`00-<32 hex>-<16 hex>-<2 hex>`; an all-zero trace id or span id, version ff, upper-case hex
or anything else is invalid and ignored (a new trace is started instead). A higher version
is read by its first four fields, as the recommendation asks.
"""

from __future__ import annotations

import contextvars
import hashlib
import os
import re
import threading
from dataclasses import dataclass
from typing import Final

_V00: Final = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})\Z")
_LATER: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16
#: a traceparent longer than this is not one (version 00 is 55 characters)
_MAX_LEN: Final = 512


@dataclass(frozen=True, slots=True)
class TraceContext:
    """One position in a trace: the trace, the span that is the parent of what comes next,
    and whether the trace is sampled."""

    trace_id: str
    span_id: str
    sampled: bool = True

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"

    def child(self) -> TraceContext:
        """The same trace, a new span id (a call made from this position)."""
        return TraceContext(self.trace_id, new_span_id(), self.sampled)


def parse(value: str | bytes | None) -> TraceContext | None:
    """A `traceparent` header value, or None when absent or invalid."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if len(value) > _MAX_LEN:
        return None
    value = value.strip(" \t")
    m = _V00.match(value)
    if m is not None:
        trace_id, span_id, flags = m.groups()
    else:
        later = _LATER.match(value)
        if later is None or later.group(1) in ("00", "ff"):
            return None
        _, trace_id, span_id, flags = later.groups()[:4]
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return TraceContext(trace_id, span_id, bool(int(flags, 16) & 1))


class _RandomPool:
    """Random bytes from the OS CSPRNG in 4 KiB reads: one getrandom call per few hundred
    ids instead of one each (a begin and every phase-two call make one)."""

    _READ: Final = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()  # OTLP export threads may ask too
        self._pool = b""
        self._at = 0

    def hex(self, size: int) -> str:
        with self._lock:
            if self._at + size > len(self._pool):
                self._pool, self._at = os.urandom(self._READ), 0
            at = self._at
            self._at = at + size
            return self._pool[at : at + size].hex()


_random: Final = _RandomPool()


def new_trace_id() -> str:
    while True:
        value = _random.hex(16)
        if value != _ZERO_TRACE:
            return value


def new_span_id() -> str:
    while True:
        value = _random.hex(8)
        if value != _ZERO_SPAN:
            return value


def new_root(sampled: bool = True) -> TraceContext:
    return TraceContext(new_trace_id(), new_span_id(), sampled)


def transaction_span_id(xid: str) -> str:
    """The span id of the transaction's own span (begin → final), derived from its XID:
    every process and every restart names the same span without storing it."""
    value = hashlib.sha256(xid.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return value if value != _ZERO_SPAN else "0" * 15 + "1"


def transaction_context(xid: str, stored: TraceContext) -> TraceContext:
    """The position of the transaction's own span, parent of every call made for it."""
    return TraceContext(stored.trace_id, transaction_span_id(xid), stored.sampled)


def from_headers(headers: list[tuple[bytes, bytes]] | None) -> TraceContext | None:
    """The request's trace context, from its (pass-through) header fields."""
    for name, value in headers or ():
        if len(name) == 11 and name.lower() == b"traceparent":
            return parse(value)
    return None


# --- what the code running now is about (log lines) ------------------------------------------

#: (trace, xid) of the request or transaction being handled: set where one is handled, read
#: by the log formatter and by the calls made on its behalf
_current: Final[contextvars.ContextVar[tuple[TraceContext | None, str | None]]] = (
    contextvars.ContextVar("gts_trace", default=(None, None))
)


def current() -> tuple[TraceContext | None, str | None]:
    return _current.get()


def current_trace() -> TraceContext | None:
    return _current.get()[0]


def enter(
    trace: TraceContext | None, xid: str | None
) -> contextvars.Token[tuple[TraceContext | None, str | None]]:
    """Code from here (and tasks it creates) is about `trace` / `xid`; `leave` undoes it."""
    return _current.set((trace, xid))


def leave(token: contextvars.Token[tuple[TraceContext | None, str | None]]) -> None:
    _current.reset(token)


def about(trace: TraceContext | None, xid: str | None) -> contextvars.Context:
    """A copy of the current context about `trace` / `xid`: `ctx.run(fn)` runs `fn` (and
    the tasks it creates) in it without touching the caller's (a connection's callbacks
    share one context across its requests)."""
    ctx = contextvars.copy_context()
    ctx.run(_current.set, (trace, xid))
    return ctx
