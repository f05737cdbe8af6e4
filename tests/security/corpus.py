"""The HTTP/1.1 desync and smuggling corpus shared by the proxy-listener tests.

Each `Case` is one raw request stream. `{P}` in it stands for the path prefix that routes it
(empty on the inbound listener, `/up` on the outbound one), so that a request smuggled out of
it would reach the same recording upstream as `/smuggled`.

`refused_by` documents which layer says no:

- `llhttp`: the C parser (httptools) raises on the bytes by itself;
- `sidecar`: llhttp hands us a well-formed message and our own code refuses it
  (sidecar/proxy/headers.py, listener.py, exchange.py, inbound.py, outbound.py);
- `nobody`: the input is legal (or tolerable) HTTP and is forwarded as exactly one request,
  re-framed by the sidecar.

`test_smuggling.py::test_reference_llhttp_verdict` re-checks the llhttp column against the
installed httptools, so the table cannot silently go stale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import httptools

SMUGGLED = b"GET {P}/smuggled HTTP/1.1\r\nHost: t\r\n\r\n"
CHUNKED = b"POST {P}/first HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"


def post(*headers: bytes, body: bytes = b"", method: bytes = b"POST") -> bytes:
    """`POST {P}/first` with exactly these header lines (CRLF added) and raw body bytes."""
    lines = [method + b" {P}/first HTTP/1.1", b"Host: t", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@dataclass(frozen=True)
class Case:
    id: str
    data: bytes
    #: refuse: a sidecar error answers; forward: exactly one request reaches the upstream
    outcome: Literal["refuse", "forward"]
    #: who answers in the sidecar (checked from the error message)
    refused_by: Literal["llhttp", "sidecar", "nobody"]
    #: the statuses a refusal may have
    statuses: tuple[int, ...] = (400,)
    #: the error code (None: any, for refusals we do not make yet)
    code: str | None = "BAD_REQUEST"
    #: the sidecar closes the connection after its answer (framing can no longer be trusted)
    closed: bool = True
    #: append a request after the stream: it must never reach the upstream when `closed`
    smuggle: bool = True
    #: forward: the body the upstream must receive
    body: bytes = b""
    #: refuse: the head was valid and may already be on its way upstream before the body
    #: breaks; such a request must arrive *incomplete* (the upstream sees a cut connection)
    head_may_reach_upstream: bool = False
    #: a bare llhttp parser refuses the bytes too (default: iff refused_by == "llhttp"); it
    #: differs where our code refuses first, before llhttp would
    llhttp_alone: bool | None = None
    #: a known bug: "BUG: file:line cause; fix" (the case runs as a strict xfail)
    bug: str | None = None

    def render(self, prefix: bytes) -> bytes:
        data = self.data + (SMUGGLED if self.smuggle else b"")
        return data.replace(b"{P}", prefix)

    @property
    def llhttp_refuses(self) -> bool:
        return self.refused_by == "llhttp" if self.llhttp_alone is None else self.llhttp_alone


def _refuse(id: str, data: bytes, by: Literal["llhttp", "sidecar"], **kw: Any) -> Case:
    return Case(id, data, "refuse", by, **kw)


def _chunks(id: str, chunks: bytes) -> Case:
    """A chunked POST whose head is fine and whose body framing breaks in `chunks`."""
    return Case(id, CHUNKED + chunks, "refuse", "llhttp", head_may_reach_upstream=True)


def _forward(id: str, data: bytes, body: bytes, **kw: Any) -> Case:
    return Case(id, data, "forward", "nobody", body=body, smuggle=False, **kw)


#: a request as body bytes (no {P}: body bytes are opaque and must keep their length)
HIDDEN = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"


_TE = b"Transfer-Encoding: chunked"
_CL5 = b"Content-Length: 5"
_HELLO_CHUNKED = b"5\r\nhello\r\n0\r\n\r\n"

CASES: list[Case] = [
    # --- Content-Length together with Transfer-Encoding (CL.TE / TE.CL) ---------------------------
    _refuse("cl-then-te", post(_CL5, _TE, body=b"0\r\n\r\n"), "llhttp"),
    _refuse("te-then-cl", post(_TE, _CL5, body=b"0\r\n\r\n"), "llhttp"),
    _refuse("cl-te-cl", post(_CL5, _TE, _CL5, body=b"0\r\n\r\n"), "llhttp"),
    _refuse(
        "te-identity-with-cl", post(b"Transfer-Encoding: identity", _CL5, body=b"hello"), "llhttp"
    ),
    _refuse(
        "te-gzip-chunked-with-cl",
        post(b"Transfer-Encoding: gzip, chunked", _CL5, body=b"0\r\n\r\n"),
        "llhttp",
    ),
    # --- duplicate or conflicting Content-Length --------------------------------------------------
    _refuse("cl-list-5-6", post(b"Content-Length: 5, 6", body=b"hello!"), "llhttp"),
    _refuse("cl-list-5-5", post(b"Content-Length: 5, 5", body=b"hello"), "llhttp"),
    _refuse("cl-twice-same", post(_CL5, _CL5, body=b"hello"), "llhttp"),
    _refuse("cl-twice-different", post(_CL5, b"Content-Length: 6", body=b"hello!"), "llhttp"),
    _refuse("cl-plus-sign", post(b"Content-Length: +5", body=b"hello"), "llhttp"),
    _refuse("cl-minus-sign", post(b"Content-Length: -5", body=b"hello"), "llhttp"),
    _refuse("cl-hex", post(b"Content-Length: 0x5", body=b"hello"), "llhttp"),
    _refuse("cl-empty", post(b"Content-Length: ", body=b"hello"), "llhttp"),
    _refuse(
        "cl-overflow", post(b"Content-Length: 99999999999999999999999", body=b"hello"), "llhttp"
    ),
    _refuse("cl-inner-space", post(b"Content-Length: 5 5", body=b"hello"), "llhttp"),
    _refuse("cl-space-before-colon", post(b"Content-Length : 5", body=b"hello"), "llhttp"),
    _forward("cl-leading-ows", post(b"Content-Length:  5", body=b"hello"), b"hello"),
    _forward(
        "cl-trailing-tab",
        post(b"Content-Length: 5\t", body=b"hello"),
        b"hello",
    ),
    _forward(
        "cl-leading-zeros",
        post(b"Content-Length: 010", body=b"0123456789"),
        b"0123456789",
    ),
    _forward("cl-uppercase-name", post(b"CONTENT-LENGTH: 5", body=b"hello"), b"hello"),
    _forward("cl-underscore-ignored", post(b"content_length: 1", _CL5, body=b"hello"), b"hello"),
    # --- obfuscated Transfer-Encoding -------------------------------------------------------------
    _forward(
        "te-trailing-space", post(b"Transfer-Encoding: chunked ", body=_HELLO_CHUNKED), b"hello"
    ),
    _forward("te-leading-tab", post(b"Transfer-Encoding:\tchunked", body=_HELLO_CHUNKED), b"hello"),
    _forward("te-uppercase", post(b"TRANSFER-ENCODING: CHUNKED", body=_HELLO_CHUNKED), b"hello"),
    _refuse(
        "te-xchunked",
        post(b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n"),
        "sidecar",
        llhttp_alone=True,
    ),
    _refuse(
        "te-chunkedx",
        post(b"Transfer-Encoding: chunkedx", body=b"0\r\n\r\n"),
        "sidecar",
        llhttp_alone=True,
    ),
    _refuse(
        "te-quoted",
        post(b'Transfer-Encoding: "chunked"', body=b"0\r\n\r\n"),
        "sidecar",
        llhttp_alone=True,
    ),
    _refuse(
        "te-chunked-chunked",
        post(b"Transfer-Encoding: chunked, chunked", body=b"0\r\n\r\n"),
        "llhttp",
    ),
    _refuse("te-chunked-comma", post(b"Transfer-Encoding: chunked,", body=b"0\r\n\r\n"), "llhttp"),
    _refuse("te-twice", post(_TE, _TE, body=b"0\r\n\r\n"), "llhttp"),
    _refuse(
        "te-space-before-colon", post(b"Transfer-Encoding : chunked", body=b"0\r\n\r\n"), "llhttp"
    ),
    _refuse("te-vertical-tab", post(b"Transfer-Encoding:\x0bchunked", body=b"0\r\n\r\n"), "llhttp"),
    _refuse("te-nul", post(b"Transfer-Encoding: chunked\x00", body=b"0\r\n\r\n"), "llhttp"),
    _refuse("te-obs-fold", post(b"Transfer-Encoding:", b" chunked", body=b"0\r\n\r\n"), "llhttp"),
    _refuse(
        "te-chunked-identity",
        post(b"Transfer-Encoding: chunked, identity", body=b"0\r\n\r\n"),
        "llhttp",
    ),
    _refuse(
        "te-identity",
        post(b"Transfer-Encoding: identity", body=b"hello"),
        "sidecar",
        llhttp_alone=True,
    ),
    _refuse(
        "te-gzip", post(b"Transfer-Encoding: gzip", body=b"hello"), "sidecar", llhttp_alone=True
    ),
    _refuse(
        "te-gzip-chunked",
        post(b"Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"),
        "sidecar",
        statuses=(501,),
        code="NOT_IMPLEMENTED",
    ),
    _refuse(
        "te-on-http10",
        post(_TE, body=_HELLO_CHUNKED).replace(b"HTTP/1.1", b"HTTP/1.0"),
        "sidecar",
    ),
    _forward(
        "te-underscore-with-cl", post(b"transfer_encoding: chunked", _CL5, body=b"hello"), b"hello"
    ),
    # --- header line syntax -----------------------------------------------------------------------
    _refuse("obs-fold-space", post(b"X-A: a", b" folded"), "llhttp"),
    _refuse("obs-fold-tab", post(b"X-A: a", b"\tfolded"), "llhttp"),
    _refuse("space-before-first-header", b"GET {P}/ HTTP/1.1\r\n Host: t\r\n\r\n", "llhttp"),
    _refuse("bare-lf-everywhere", b"GET {P}/ HTTP/1.1\nHost: t\n\n", "llhttp"),
    _refuse("bare-lf-after-header", b"GET {P}/ HTTP/1.1\r\nHost: t\nX: y\r\n\r\n", "llhttp"),
    _refuse("bare-lf-end-of-head", b"GET {P}/ HTTP/1.1\r\nHost: t\r\n\n", "llhttp"),
    _refuse("bare-cr-request-line", b"GET {P}/ HTTP/1.1\rHost: t\r\n\r\n", "llhttp"),
    _refuse("bare-cr-in-value", post(b"X-A: a\rb"), "llhttp"),
    _refuse("nul-in-value", post(b"X-A: a\x00b"), "llhttp"),
    _refuse("nul-in-name", post(b"X\x00A: b"), "llhttp"),
    _refuse("del-in-value", post(b"X-A: a\x7fb"), "llhttp"),
    _refuse("ctl-in-value", post(b"X-A: a\x01b"), "llhttp"),
    _refuse("empty-header-name", post(b": x"), "llhttp"),
    _refuse("no-colon", post(b"X-A x"), "llhttp"),
    _forward("obs-text-in-value", post(b"X-A: caf\xe9", _CL5, body=b"hello"), b"hello"),
    # --- chunked body framing ---------------------------------------------------------------------
    _chunks("chunk-size-0x", b"0x5\r\nhello\r\n0\r\n\r\n"),
    _chunks("chunk-size-negative", b"-1\r\nh\r\n0\r\n\r\n"),
    _chunks("chunk-size-overflow", b"ffffffffffffffffff\r\nh\r\n0\r\n\r\n"),
    _chunks("chunk-size-trailing-space", b"5 \r\nhello\r\n0\r\n\r\n"),
    _chunks("chunk-size-missing", b"\r\nhello\r\n0\r\n\r\n"),
    _chunks("chunk-data-no-crlf", b"5\r\nhelloX0\r\n\r\n"),
    _chunks("chunk-data-too-long", b"3\r\nhello\r\n0\r\n\r\n"),
    _chunks("chunk-data-bare-lf", b"5\r\nhello\n0\r\n\r\n"),
    _chunks("chunk-size-bare-lf", b"5\nhello\r\n0\r\n\r\n"),
    _chunks("last-chunk-bare-lf", b"5\r\nhello\r\n0\n\n"),
    _chunks("trailer-bare-lf", b"0\r\nX: y\n\r\n"),
    _chunks("chunk-ext-bare-cr", b"5;a\rb\r\nhello\r\n0\r\n\r\n"),
    _chunks("chunk-ext-bare-lf", b"5;a\nb\r\nhello\r\n0\r\n\r\n"),
    _chunks("chunk-ext-crlf-in-quotes", b'5;a="b\r\nc"\r\nhello\r\n0\r\n\r\n'),
    _refuse(
        "chunk-ext-oversized",
        CHUNKED + b"5;" + b"e" * (64 << 10) + b"\r\nhello\r\n0\r\n\r\n",
        "sidecar",
        statuses=(413, 400),
        code=None,
        head_may_reach_upstream=True,
    ),
    _refuse(
        "trailer-oversized-field",
        CHUNKED + b"5\r\nhello\r\n0\r\nX-T: " + b"t" * (1 << 20) + b"\r\n\r\n",
        "sidecar",
        statuses=(431, 400, 413),
        code=None,
        head_may_reach_upstream=True,
    ),
    _refuse(
        "trailer-too-many-fields",
        CHUNKED + b"5\r\nhello\r\n0\r\n" + b"X-T: t\r\n" * 5000 + b"\r\n",
        "sidecar",
        statuses=(431, 400, 413),
        code=None,
        head_may_reach_upstream=True,
    ),
    _forward("chunk-ext-ordinary", CHUNKED + b"5;name=value\r\nhello\r\n0\r\n\r\n", b"hello"),
    _forward("chunked-with-trailer", CHUNKED + b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n", b"hello"),
    # --- request line -----------------------------------------------------------------------------
    _refuse("request-line-extra-token", b"GET {P}/ HTTP/1.1 extra\r\nHost: t\r\n\r\n", "llhttp"),
    _refuse("request-line-tabs", b"GET\t{P}/\tHTTP/1.1\r\nHost: t\r\n\r\n", "llhttp"),
    _refuse("request-line-lowercase-version", b"GET {P}/ http/1.1\r\nHost: t\r\n\r\n", "llhttp"),
    _refuse("request-line-space-in-target", b"GET {P}/a b HTTP/1.1\r\nHost: t\r\n\r\n", "llhttp"),
    _refuse("request-line-ctl-in-target", b"GET {P}/a\x01b HTTP/1.1\r\nHost: t\r\n\r\n", "llhttp"),
    _refuse("request-line-bad-method", b"G@T {P}/ HTTP/1.1\r\nHost: t\r\n\r\n", "llhttp"),
    _refuse("request-line-unknown-method", b"SMUGGLE {P}/ HTTP/1.1\r\nHost: t\r\n\r\n", "llhttp"),
    _refuse("request-line-version-9.9", b"GET {P}/ HTTP/9.9\r\nHost: t\r\n\r\n", "llhttp"),
    _refuse("request-line-nul", b"G\x00T {P}/ HTTP/1.1\r\nHost: t\r\n\r\n", "llhttp"),
    _refuse(
        "tls-client-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "llhttp", smuggle=False
    ),
    _refuse(
        "http-0.9",
        b"GET {P}/nine\r\n\r\n",
        "sidecar",
        statuses=(400, 505),
        code=None,
    ),
    _refuse(
        "http-2.0-in-http1",
        b"GET {P}/ HTTP/2.0\r\nHost: t\r\n\r\n",
        "sidecar",
        statuses=(400, 505),
        code=None,
    ),
    # a kept-alive request is taken for HTTP/1.1 without asking llhttp for its version only
    # when no Connection header asked for keep-alive: one that did is still refused
    _refuse(
        "http-2.0-keep-alive-in-http1",
        b"GET {P}/ HTTP/2.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n",
        "sidecar",
        statuses=(400, 505),
        code=None,
    ),
    _refuse(
        "http-0.9-version-keep-alive",
        b"GET {P}/ HTTP/0.9\r\nHost: t\r\nConnection: keep-alive\r\n\r\n",
        "sidecar",
        statuses=(400, 505),
        code=None,
    ),
    # (the HTTP/2 preface opens an HTTP/2 connection now: tests/component/test_http2.py)
    # --- Host -------------------------------------------------------------------------------------
    _refuse(
        "host-missing-http11",
        b"GET {P}/ HTTP/1.1\r\n\r\n",
        "sidecar",
        closed=False,
        smuggle=False,
    ),
    _refuse(
        "host-empty-http11",
        b"GET {P}/ HTTP/1.1\r\nHost: \r\n\r\n",
        "sidecar",
        closed=False,
        smuggle=False,
    ),
    _refuse(
        "two-host-headers",
        b"GET {P}/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "sidecar",
        closed=False,
        smuggle=False,
    ),
    # --- Expect -----------------------------------------------------------------------------------
    _forward("expect-100-continue", post(b"Expect: 100-continue", _CL5, body=b"hello"), b"hello"),
    _forward("expect-unknown", post(b"Expect: 100-continuex", _CL5, body=b"hello"), b"hello"),
    _forward(
        "expect-on-bodiless-get",
        b"GET {P}/first HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n\r\n",
        b"",
    ),
    # --- a second request hidden in a body --------------------------------------------------------
    _forward("request-in-cl-body", post(b"Content-Length: 35", body=HIDDEN), HIDDEN),
    _forward("request-in-chunked-body", CHUNKED + b"23\r\n" + HIDDEN + b"\r\n0\r\n\r\n", HIDDEN),
    _forward(
        "request-in-get-body", post(b"Content-Length: 35", body=HIDDEN, method=b"GET"), HIDDEN
    ),
    # refused by a filter before its body arrived: the body is never read as a request
    _refuse(
        "refused-head-with-request-in-body",
        post(b"XID: not-an-xid", b"Content-Length: 35", body=HIDDEN),
        "sidecar",
        code="XID_INVALID",
    ),
    _refuse(
        "refused-head-with-request-in-chunked-body",
        post(b"XID: 10.0.0.1:8091:", _TE, body=b"23\r\n" + HIDDEN + b"\r\n0\r\n\r\n"),
        "sidecar",
        code="XID_INVALID",
    ),
]


def llhttp_verdict(data: bytes) -> str | None:
    """The error a bare llhttp (httptools) parser raises on `data`, or None if it takes it."""

    class Sink:
        def on_url(self, url: bytes) -> None:
            pass

    parser = httptools.HttpRequestParser(Sink())
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        return None
    except httptools.HttpParserError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
