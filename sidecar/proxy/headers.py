"""Request-head model and the header rules of both proxy listeners.

Rules: pure — no sockets, no clock. The listener feeds parsed (name, value) pairs into a
`RequestHead`; this module decides which headers are hop-by-hop or framing (never copied),
which carry the XID (validated here, re-written by the caller), and renders the head that goes
upstream. Header values are forwarded byte for byte; nothing is normalised or "repaired".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

from sidecar import xid as xidmod
from sidecar.errors import BadRequest, NotImplementedByProxy, SidecarError, XidInvalid

# Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
# non-standard ones proxies commonly strip. `connection`-listed names are added per request.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Framing is recomputed by us; a copied Content-Length/Transfer-Encoding (or an underscore
# spelling that a CGI-style upstream would fold into the same variable) is a smuggling vector.
FRAMING: Final = frozenset(
    {b"content-length", b"transfer-encoding", b"content_length", b"transfer_encoding"}
)

# classification codes, looked up once per header name
PASS: Final = 0
DROP: Final = 1
XID: Final = 2
HOST: Final = 3
CONTENT_LENGTH: Final = 4
TRANSFER_ENCODING: Final = 5
CONNECTION: Final = 6
EXPECT: Final = 7
XFF: Final = 8
XFP: Final = 9
#: `x-gts-*` (any spelling), or a name the sidecar writes the XID under for the app that is
#: not an accepted alias: the inbound router strips the client's
GTS: Final = 10
#: `Idempotency-Key` (any spelling): recorded on the head; inbound strips the client's
IDEMPOTENCY_KEY: Final = 11
#: `Upgrade`: hop-by-hop (never forwarded), but recorded so an HTTP/2 offer can be told apart
UPGRADE: Final = 12

_GTS_PREFIX: Final = b"x-gts-"
_IDEMPOTENCY_KEY: Final = b"idempotency-key"
#: header names remembered beyond the configured ones (a flood of distinct names costs one
#: fold each, never memory)
_LEARNED_MAX: Final = 1024


def fold(lname: bytes) -> bytes:
    """A lower-cased header name with `_` read as `-`: CGI, WSGI, PHP and many gateways
    map both to the same variable (HTTP_TX_XID), so both spellings are one header."""
    return lname.replace(b"_", b"-")


class Classifier(dict[bytes, int]):
    """Lower-cased header name → classification code. The configured names are looked up as
    they are; a name seen for the first time is classified once by its folded spelling (so
    `TX-XID` is the alias `TX_XID`, `X_GTS_Phase` is `x-gts-phase`) and remembered."""

    def __init__(self, table: dict[bytes, int]) -> None:
        super().__init__(table)
        # a configured spelling wins over another that folds the same (content-length over
        # content_length, which is dropped)
        self._folded: dict[bytes, int] = {}
        for name in sorted(table, key=lambda n: b"_" in n):
            self._folded.setdefault(fold(name), table[name])
        self._learned = 0

    def __missing__(self, lname: bytes) -> int:
        folded = fold(lname)
        kind = self._folded.get(folded)
        if kind is None:
            kind = GTS if folded.startswith(_GTS_PREFIX) else PASS
        if self._learned < _LEARNED_MAX:
            self._learned += 1
            self[lname] = kind
        return kind


def build_classifier(xid_aliases: Sequence[str], app_headers: Sequence[str] = ()) -> Classifier:
    """The header classifier of the proxy listeners (index it: `classifier[lname]`).
    `app_headers`: the names the app reads the XID under; one that is not an alias is
    never taken from a client (else it would reach the app unvalidated)."""
    table: dict[bytes, int] = {name: DROP for name in HOP_BY_HOP | FRAMING}
    table[b"content-length"] = CONTENT_LENGTH
    table[b"transfer-encoding"] = TRANSFER_ENCODING
    table[b"connection"] = CONNECTION
    table[b"host"] = HOST
    table[b"expect"] = EXPECT
    table[b"x-forwarded-for"] = XFF
    table[b"x-forwarded-proto"] = XFP
    table[_IDEMPOTENCY_KEY] = IDEMPOTENCY_KEY
    table[b"upgrade"] = UPGRADE
    table[b"x-gts-branch-id"] = GTS
    table[b"x-gts-phase"] = GTS
    aliases = {fold(a.lower().encode("latin-1")) for a in xid_aliases}
    for name in app_headers:
        lname = name.lower().encode("latin-1")
        if fold(lname) not in aliases:
            table[lname] = GTS
    for alias in xid_aliases:
        table[alias.lower().encode("latin-1")] = XID
    return Classifier(table)


def client_only(lname: bytes) -> bool:
    """A header the inbound listener never passes from a client: `x-gts-*` or
    `Idempotency-Key`, in any spelling."""
    folded = fold(lname)
    return folded.startswith(_GTS_PREFIX) or folded == _IDEMPOTENCY_KEY


def is_idempotency_key(lname: bytes) -> bool:
    return fold(lname) == _IDEMPOTENCY_KEY


_XID_CACHE_SIZE: Final = 4096


def resolve_xid(
    found: list[tuple[bytes, bytes]],
    max_length: int,
    cache: dict[bytes, xidmod.Xid] | None = None,
) -> xidmod.Xid:
    """The one XID a request carries, from every alias header it sent.

    A header sent twice is refused even when both copies agree: a repeated XID header is
    how a truncated or injected copy rides along with a good one, and intermediaries differ
    in which copy they keep. `TX_XID` and `TX-XID` are the same header here (see fold).
    """
    first_name, first_value = found[0]
    if len(found) > 1:
        seen: set[bytes] = set()
        for name, value in found:
            lname = fold(name.lower())
            if lname in seen:
                raise XidInvalid(
                    f"XID header {name.decode('latin-1')} appears more than once",
                    header=name.decode("latin-1"),
                    reason="repeated",
                )
            seen.add(lname)
            if value != first_value:
                raise XidInvalid(
                    f"XID headers disagree: {first_name.decode('latin-1')} and "
                    f"{name.decode('latin-1')} carry different values",
                    header=name.decode("latin-1"),
                    reason="conflict",
                )
    if cache is not None:
        hit = cache.get(first_value)
        if hit is not None:
            return hit
    try:
        parsed = xidmod.parse(first_value, max_length)
    except XidInvalid as exc:
        exc.header = first_name.decode("latin-1")
        raise
    if cache is not None:
        if len(cache) >= _XID_CACHE_SIZE:
            cache.clear()  # crude but bounded; a transaction's XID is back in one miss
        cache[first_value] = parsed
    return parsed


# init=False: __init__ is written out because a dataclass compiled by mypyc keeps the
# generated __init__, which runs interpreted (~25 fields, once per request)
@dataclass(slots=True, init=False)
class RequestHead:
    """One parsed request head, split by the classifier."""

    method: bytes
    url: bytes
    #: pass-through headers, in order, exactly as received
    headers: list[tuple[bytes, bytes]] | None
    host: bytes | None
    host_count: int
    xid_headers: list[tuple[bytes, bytes]] | None
    content_length: bytes | None
    chunked: bool
    connection_tokens: list[bytes] | None
    expect_continue: bool
    #: the Upgrade field's protocols, lower-cased (the field itself is never forwarded)
    upgrade: list[bytes] | None
    forwarded_for: bytes | None
    forwarded_proto: bytes | None
    keep_alive: bool
    http_minor: int
    #: a Transfer-Encoding other than one `chunked`: refused (see te_problem)
    unsupported_te: bytes | None
    #: the client's Idempotency-Key (its first one), recorded before the inbound router
    #: strips it; a declarative transaction route answers a repeat from it
    idempotency_key: bytes | None
    #: the request carried more than one Idempotency-Key field
    idempotency_key_repeated: bool
    #: the request carried an `x-gts-*` or Idempotency-Key field (in `headers`): the inbound
    #: router strips them
    client_only: bool

    def __init__(
        self,
        method: bytes = b"",
        url: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.method = method
        self.url = url
        self.headers = headers
        self.host = None
        self.host_count = 0
        self.xid_headers = None
        self.content_length = None
        self.chunked = False
        self.connection_tokens = None
        self.expect_continue = False
        self.upgrade = None
        self.forwarded_for = None
        self.forwarded_proto = None
        self.keep_alive = True
        self.http_minor = 1
        self.unsupported_te = None
        self.idempotency_key = None
        self.idempotency_key_repeated = False
        self.client_only = False

    def te_problem(self) -> SidecarError | None:
        """RFC 9112 §6.3: a request whose final coding is not chunked has no determinable
        length (400); other codings before chunked we do not carry (501, as Envoy)."""
        te = self.unsupported_te
        if te is None:
            return None
        shown = te[:64].decode("latin-1")
        codings = [c.strip().lower() for c in te.split(b",")]
        if codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
            return BadRequest(f"Transfer-Encoding {shown!r} does not end in a single chunked")
        return NotImplementedByProxy(
            f"Transfer-Encoding {shown!r} is not supported (only 'chunked')"
        )

    def add(self, name: bytes, value: bytes, kind: int) -> None:
        if kind == PASS:
            assert self.headers is not None
            self.headers.append((name, value))
        elif kind == XID:
            if self.xid_headers is None:
                self.xid_headers = []
            self.xid_headers.append((name, value))
        elif kind == HOST:
            self.host = value
            self.host_count += 1
        elif kind == CONTENT_LENGTH:
            # llhttp has checked it is one decimal number; render it canonically, so that no
            # upstream reads `010` as octal or trips on stray whitespace
            self.content_length = b"%d" % int(value)
        elif kind == TRANSFER_ENCODING:
            # Only a single `chunked` is accepted (as Envoy does): other codings would have to
            # be carried through untouched, and llhttp validates them only after the head is
            # complete, too late for a request already on its way.
            if self.chunked or value.strip().lower() != b"chunked":
                prior = self.unsupported_te or (b"chunked" if self.chunked else None)
                self.unsupported_te = value if prior is None else prior + b", " + value
            self.chunked = True
        elif kind == CONNECTION:
            tokens = [t.strip().lower() for t in value.split(b",") if t.strip()]
            if self.connection_tokens is None:
                self.connection_tokens = tokens
            else:
                self.connection_tokens.extend(tokens)
        elif kind == EXPECT:
            if value.strip().lower() == b"100-continue":
                self.expect_continue = True
            else:
                assert self.headers is not None
                self.headers.append((name, value))
        elif kind == XFF:
            self.forwarded_for = (
                value if self.forwarded_for is None else self.forwarded_for + b", " + value
            )
        elif kind == XFP:
            self.forwarded_proto = value
        elif kind == GTS or kind == IDEMPOTENCY_KEY:
            # passed on by the outbound listener (the app's own), stripped by the inbound one
            assert self.headers is not None
            self.headers.append((name, value))
            self.client_only = True
            if kind == IDEMPOTENCY_KEY:
                if self.idempotency_key is None:
                    self.idempotency_key = value
                else:
                    self.idempotency_key_repeated = True
        elif kind == UPGRADE:
            protocols = [t.strip().lower() for t in value.split(b",") if t.strip()]
            self.upgrade = protocols if self.upgrade is None else self.upgrade + protocols
        # DROP: hop-by-hop and underscore framing headers vanish here

    def strip_connection_listed(self) -> None:
        """Drop headers named in Connection (they are hop-by-hop for this hop only)."""
        if not self.connection_tokens or self.headers is None:
            return
        listed = {t for t in self.connection_tokens if t not in (b"close", b"keep-alive")}
        if listed:
            self.headers = [(n, v) for n, v in self.headers if n.lower() not in listed]

    @property
    def offers_h2c(self) -> bool:
        """An HTTP/2 upgrade offer (`Upgrade: h2c`), which Java's HttpClient, Spring's
        RestClient, Ktor and `curl --http2` send on plain-text requests. A server may ignore
        an Upgrade and answer in HTTP/1.1 (RFC 9110 §7.8), as nginx and Envoy do."""
        return self.upgrade is not None and all(p == b"h2c" for p in self.upgrade)

    @property
    def has_body(self) -> bool:
        return self.chunked or (self.content_length is not None and self.content_length != b"0")


# RFC 3986 host (reg-name, IPv4, or a bracketed IP literal) and an optional port
_HOST_RE: Final = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::[0-9]{0,5})?"
)


#: Host values already found valid: a client sends the same one on every request, so the
#: regex runs once per value, not per request. Bounded: emptied when full.
_VALID_HOSTS: Final[set[bytes]] = set()
VALID_HOSTS_MAX: Final = 1024


def valid_host(value: bytes) -> bool:
    if value in _VALID_HOSTS:
        return True
    if _HOST_RE.fullmatch(value) is None:
        return False
    if len(_VALID_HOSTS) >= VALID_HOSTS_MAX:
        _VALID_HOSTS.clear()
    _VALID_HOSTS.add(value)
    return True


def split_target(url: bytes) -> tuple[bytes, bytes]:
    """Origin-form target → (path, '?query' or b'')."""
    path, sep, query = url.partition(b"?")
    return path, (sep + query)


def render_request_head(
    method: bytes,
    target: bytes,
    host: bytes | None,
    headers: list[tuple[bytes, bytes]],
    extra: list[tuple[bytes, bytes]],
    content_length: bytes | None,
    chunked: bool,
) -> bytes:
    """The HTTP/1.1 head sent upstream (always keep-alive; framing recomputed)."""
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    if host is not None:
        parts += [b"host: ", host, b"\r\n"]
    for name, value in headers:
        parts += [name, b": ", value, b"\r\n"]
    for name, value in extra:
        parts += [name, b": ", value, b"\r\n"]
    if chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    elif content_length is not None:
        parts += [b"content-length: ", content_length, b"\r\n"]
    parts.append(b"\r\n")
    return b"".join(parts)


# every registered status with its standard phrase (the stdlib keeps the IANA list)
_REASONS: Final = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}
_STATUS_LINES: Final = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in _REASONS.items()
}


def status_line(code: int) -> bytes:
    line = _STATUS_LINES.get(code)
    if line is None:
        line = b"HTTP/1.1 %d \r\n" % code
    return line


# what response_fields does with a response field, by its name
_R_KEEP: Final = 0
_R_DROP: Final = 1
_R_CONTENT_LENGTH: Final = 2
_R_TRANSFER_ENCODING: Final = 3
_R_CONNECTION: Final = 4
#: that decision by the name as received: an upstream spells its fields the same way on
#: every response, so each spelling is lower-cased and looked up once. Bounded (names
#: are the upstream's to choose): emptied when full.
_RESPONSE_KIND: Final[dict[bytes, int]] = {}
RESPONSE_KIND_MAX: Final = 1024


def _response_kind(name: bytes) -> int:
    lname = name.lower()
    if lname == b"content-length":
        kind = _R_CONTENT_LENGTH
    elif lname == b"transfer-encoding":
        kind = _R_TRANSFER_ENCODING
    elif lname == b"connection":
        kind = _R_CONNECTION
    elif lname in HOP_BY_HOP or lname in FRAMING:
        kind = _R_DROP
    else:
        kind = _R_KEEP
    if len(_RESPONSE_KIND) >= RESPONSE_KIND_MAX:
        _RESPONSE_KIND.clear()
    _RESPONSE_KIND[name] = kind
    return kind


def response_fields(
    headers: list[tuple[bytes, bytes]],
) -> tuple[list[tuple[bytes, bytes]], bytes | None, bool]:
    """An upstream response's end-to-end fields, its Content-Length and whether it was
    chunked: hop-by-hop and framing fields, and fields named in its `Connection`, are for
    the hop the sidecar ends (each downstream framing computes its own)."""
    kept: list[tuple[bytes, bytes]] = []
    listed: set[bytes] | None = None
    content_length: bytes | None = None
    chunked = False
    kinds = _RESPONSE_KIND
    for name, value in headers:
        kind = kinds.get(name)
        if kind is None:
            kind = _response_kind(name)
        if kind == _R_KEEP:
            kept.append((name, value))
        elif kind == _R_CONTENT_LENGTH:
            content_length = value
        elif kind == _R_TRANSFER_ENCODING:
            chunked = b"chunked" in value.lower()
        elif kind == _R_CONNECTION:
            tokens = {t.strip().lower() for t in value.split(b",")}
            listed = tokens - {b"close", b"keep-alive"}
    if listed:
        kept = [(n, v) for n, v in kept if n.lower() not in listed]
    return kept, content_length, chunked
