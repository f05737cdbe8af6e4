"""The rules RFC 9113 (sections 8.2 and 8.3) puts on a received HTTP/2 request head, in one pass.

Rules (pure: no I/O). The same refusals as h2's own inbound validation
(`h2.utilities.validate_headers`), which the listeners' connections turn off because h2 runs
them as seven chained generators over every field (a twentieth of a proxied gRPC call):
- a name is not empty and holds no byte in 0x00-0x20, A-Z or 0x7f-0xff, and no colon past
  its first byte; a value holds no NUL, CR or LF and neither starts nor ends with SP or HTAB
  (what an HTTP/1.1 upstream would read as framing: a second request, a header of its own);
- no connection-specific field (connection, keep-alive, proxy-connection, transfer-encoding,
  upgrade), and `te` only as `trailers`;
- pseudo-header fields come first, once each, only those of a request (:method, :scheme,
  :authority, :path, and :protocol with CONNECT); :method always, :scheme and :path unless an
  ordinary CONNECT (which must not have them), and :path not empty;
- an :authority or a Host, one Host at most, and the two equal when both are there.
A head that breaks one is malformed: the caller ends the connection with PROTOCOL_ERROR, as h2
does. (The content-length against the DATA is still h2's: it does not depend on this switch.)

The checks of a field's bytes depend on the field alone, and a client repeats most of its
fields call after call (the same objects, when hpack_cache answered the block): a connection
keeps the fields that passed in a small set (`known`, emptied when full) and checks only the
others' bytes. The rules on the head as a whole run every time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

_BAD_NAME: Final = re.compile(rb"[\x00-\x20A-Z\x7f-\xff]|.:", re.S)
_BAD_VALUE: Final = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")
_CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_PSEUDO: Final = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
#: fields a connection remembers as checked, and the longest remembered (name and value: a
#: client must not make the sidecar hold its large fields)
MAX_KNOWN: Final = 64
MAX_KNOWN_FIELD: Final = 256


def field_bytes_error(name: bytes, value: bytes) -> str | None:
    """Why this field's bytes are not allowed in an HTTP/2 field, or None."""
    if not name or _BAD_NAME.search(name):
        return f"invalid header name {name!r}"
    if value and _BAD_VALUE.search(value):
        return f"invalid value in header {name!r}"
    return None


def request_error(
    fields: Iterable[tuple[bytes, bytes]], known: set[tuple[bytes, bytes]] | None = None
) -> str | None:
    """Why this request head is malformed, or None when it is not; `known` holds fields whose
    bytes passed before (those that pass now are added)."""
    seen: set[bytes] = set()
    regular = False
    method = authority = host = None
    for field in fields:
        name, value = field
        if known is None or field not in known:
            why = field_bytes_error(name, value)
            if why is not None:
                return why
            if known is not None and len(name) + len(value) <= MAX_KNOWN_FIELD:
                if len(known) >= MAX_KNOWN:
                    known.clear()
                known.add(field)
        if name[0] == 0x3A:  # ':'
            if regular:
                return f"pseudo-header field {name!r} after a regular field"
            if name not in _PSEUDO:
                return f"pseudo-header field {name!r} in a request"
            if name in seen:
                return f"repeated pseudo-header field {name!r}"
            seen.add(name)
            if name == b":method":
                method = value
            elif name == b":authority":
                authority = value
            elif name == b":path" and not value:
                return "empty :path"
            continue
        regular = True
        if name in _CONNECTION_SPECIFIC:
            return f"connection-specific header field {name!r}"
        if name == b"te" and value.lower() != b"trailers":
            return "te other than trailers"
        if name == b"host":
            if host is not None:
                return "more than one Host"
            host = value
    if method is None:
        return "no :method"
    connect = method == b"CONNECT"
    if connect and b":protocol" not in seen:
        if b":scheme" in seen or b":path" in seen:
            return "an ordinary CONNECT with :scheme or :path"
    elif b":scheme" not in seen or b":path" not in seen:
        return "no :scheme or :path"
    if not connect and b":protocol" in seen:
        return ":protocol without CONNECT"
    if authority is None and host is None:
        return "no :authority or Host"
    if authority is not None and host is not None and authority != host:
        return ":authority and Host disagree"
    return None
