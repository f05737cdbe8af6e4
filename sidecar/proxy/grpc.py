"""gRPC's conventions over HTTP/2, as the data plane needs them. Pure: no I/O.

Rules: a request is gRPC when its content-type starts with `application/grpc`; a call's
outcome is `grpc-status` in its trailers, or in its only HEADERS frame (trailers-only); a
`grpc-timeout` is 1-8 digits and a unit (H, M, S, m, u, n); the sidecar's own errors map to
the status codes below (its answer to a gRPC request is always trailers-only).
"""

from __future__ import annotations

import re
from typing import Final

from sidecar.errors import SidecarError

#: gRPC's status codes for the sidecar's own errors
STATUS_OF_CODE: Final = {
    "XID_INVALID": 3,
    "XID_REQUIRED": 3,
    "INVALID_REQUEST": 3,
    "BAD_REQUEST": 3,
    "UPSTREAM_TIMEOUT": 4,
    "REQUEST_TIMEOUT": 4,
    "UPSTREAM_NOT_FOUND": 5,
    "PHASE_TWO_PATH": 7,
    "POOL_EXHAUSTED": 8,
    "CONNECTION_LIMIT": 8,
    "PAYLOAD_TOO_LARGE": 8,
    "TRANSACTION_ABORTED": 10,
    "BRANCH_SUSPENDED": 10,
    "DUPLICATE_REQUEST": 6,
    "REQUEST_IN_PROGRESS": 10,
    "NOT_IMPLEMENTED": 12,
    "UPSTREAM_UNAVAILABLE": 14,
    "COORDINATOR_UNAVAILABLE": 14,
    "JOURNAL_UNAVAILABLE": 14,
    "UNAUTHORIZED": 16,
    "SIGNATURE_INVALID": 16,
}
OK: Final = 0
_UNKNOWN: Final = 2
_INTERNAL: Final = 13
_TIMEOUT_RE: Final = re.compile(rb"([0-9]{1,8})([HMSmun])")
_UNIT_SECONDS: Final = {
    b"H": 3600.0,
    b"M": 60.0,
    b"S": 1.0,
    b"m": 1e-3,
    b"u": 1e-6,
    b"n": 1e-9,
}


def is_grpc(content_type: bytes | None) -> bool:
    return content_type is not None and content_type.startswith(b"application/grpc")


def request_is_grpc(headers: list[tuple[bytes, bytes]] | None) -> bool:
    for name, value in headers or ():
        if name.lower() == b"content-type":
            return is_grpc(value)
    return False


def status_of(err: SidecarError) -> int:
    """What the sidecar's error `err` is to a gRPC client: INTERNAL for other 5xx, else
    UNKNOWN."""
    code = STATUS_OF_CODE.get(err.code)
    if code is not None:
        return code
    return _INTERNAL if err.status >= 500 else _UNKNOWN


def call_status(*field_lists: list[tuple[bytes, bytes]] | None) -> int | None:
    """The `grpc-status` of a finished call: from its trailers, or from its head when it was
    trailers-only (pass both; the first that has one wins). None: the call carried none (an
    upstream that is not a gRPC server, or one that broke off)."""
    for fields in field_lists:
        for name, value in fields or ():
            if name.lower() == b"grpc-status":
                return int(value) if value.isdigit() else None
    return None


def parse_timeout(value: bytes) -> float | None:
    """A `grpc-timeout` in seconds; None when it is malformed."""
    match = _TIMEOUT_RE.fullmatch(value.strip())
    if match is None:
        return None
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def format_timeout(seconds: float) -> bytes:
    """The shortest exact-enough `grpc-timeout` for `seconds` (milliseconds, rounded down, at
    least 1: a call must never get more time than it has)."""
    millis = max(1, int(seconds * 1000))
    if millis < 100_000_000:
        return b"%dm" % millis
    return b"%dS" % min(99_999_999, millis // 1000)


def clamp_timeout(headers: list[tuple[bytes, bytes]], left: float) -> list[tuple[bytes, bytes]]:
    """`headers` with their `grpc-timeout` no longer than `left` seconds (one added when
    there was none): a call made for a transaction must not outlive it."""
    out: list[tuple[bytes, bytes]] = []
    sent: float | None = None
    for name, value in headers:
        if name.lower() == b"grpc-timeout":
            parsed = parse_timeout(value)
            if parsed is not None:
                sent = parsed if sent is None else min(sent, parsed)
            continue
        out.append((name, value))
    out.append((b"grpc-timeout", format_timeout(left if sent is None else min(sent, left))))
    return out
