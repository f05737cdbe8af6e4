"""The global transaction id (XID): parse, validate and generate (README, "The XID").

Rules: pure. No I/O, no sockets, no clock of its own (generation takes an injected clock), so
every function is tested directly and with property tests.

Format `host:port:txid`: host is an IPv4 address, a DNS name or a bracketed IPv6 address;
port 1–65535 without leading zeros; txid 1–20 decimal digits. The host:port names the
coordinator that owns the transaction. A value that does not parse is never "repaired":
a truncated XID (`10.0.1.5:8091:`) carried on would join the wrong transaction or none.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from sidecar.errors import XidInvalid

DEFAULT_MAX_LENGTH: Final = 128

_LABEL: Final = rb"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_XID_RE: Final = re.compile(
    rb"(?:\[(?P<v6>[0-9A-Fa-f:.]{2,45})\]|(?P<host>" + _LABEL + rb"(?:\." + _LABEL + rb")*))"
    rb":(?P<port>[1-9][0-9]{0,4}):(?P<txid>[0-9]{1,20})"
)
_NUMERIC_HOST_RE: Final = re.compile(rb"[0-9.]+")
_CONTROL_RE: Final = re.compile(rb"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Xid:
    host: str
    port: int
    txid: int
    #: the XID exactly as received (and as forwarded)
    raw: str

    @property
    def owner(self) -> str:
        """host:port of the owning coordinator, brackets kept for IPv6."""
        return self.raw.rpartition(":")[0]

    def __str__(self) -> str:
        return self.raw


def parse(value: str | bytes, max_length: int = DEFAULT_MAX_LENGTH) -> Xid:
    """Parse one XID or raise XidInvalid with a message that says what is wrong and a short
    `reason` (a bounded set, used as a metric label)."""
    # one transaction's XID is parsed at every hop and call (proxy, TM API, registration,
    # phase two, lock release): valid ones are remembered (Xid is immutable; errors are not
    # cached, and the cache is bounded, so distinct junk costs only its own parse)
    return _parse_cached(value, max_length)


@functools.lru_cache(maxsize=4096)
def _parse_cached(value: str | bytes, max_length: int) -> Xid:
    # a character outside latin-1 cannot come from an HTTP header; "?" is in no field's
    # grammar, so the value is refused with the reason of the field it spoils
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
    if len(raw) > max_length:
        raise XidInvalid(
            f"XID is {len(raw)} bytes, longer than the {max_length}-byte limit", reason="length"
        )
    m = _XID_RE.fullmatch(raw)
    if m is None:
        raise _explain(raw)
    port = int(m.group("port"))
    if port > 65535:
        raise XidInvalid(f"XID {_show(raw)} has port {port}, outside 1-65535", reason="port")
    v6 = m.group("v6")
    if v6 is not None:
        try:
            host = str(ipaddress.IPv6Address(v6.decode("ascii")))
        except ValueError:
            raise XidInvalid(f"XID {_show(raw)} has an invalid IPv6 host", reason="host") from None
    else:
        host_b = m.group("host")
        if _NUMERIC_HOST_RE.fullmatch(host_b):
            # all-numeric names are not DNS names (RFC 1123 §2.1): it must be an IPv4 address
            try:
                ipaddress.IPv4Address(host_b.decode("ascii"))
            except ValueError:
                raise XidInvalid(
                    f"XID {_show(raw)} has an invalid IPv4 host", reason="host"
                ) from None
        host = host_b.decode("ascii")
    return Xid(host=host, port=port, txid=int(m.group("txid")), raw=raw.decode("ascii"))


def _show(raw: bytes) -> str:
    """A safe, bounded rendering of untrusted input for error messages and logs."""
    text = raw[:64].decode("latin-1")
    return repr(text + ("…" if len(raw) > 64 else ""))


def _explain(raw: bytes) -> XidInvalid:
    """Say why a value that failed the pattern is invalid, most specific reason first."""
    if not raw:
        return XidInvalid("XID is empty", reason="empty")
    if _CONTROL_RE.search(raw):
        return XidInvalid("XID contains control characters", reason="control")
    # split on colons outside brackets
    fields: list[bytes] = []
    depth, start = 0, 0
    for i, c in enumerate(raw):
        if c == 0x5B:  # [
            depth += 1
        elif c == 0x5D and depth:  # ] (a stray one must not hide the colons after it)
            depth -= 1
        elif c == 0x3A and depth == 0:
            fields.append(raw[start:i])
            start = i + 1
    fields.append(raw[start:])
    if len(fields) != 3:
        if len(fields) < 3:
            return XidInvalid(
                f"XID {_show(raw)} has {len(fields)} field(s); expected host:port:txid "
                "(truncated?)",
                reason="truncated",
            )
        return XidInvalid(
            f"XID {_show(raw)} has {len(fields)} fields; expected exactly host:port:txid",
            reason="format",
        )
    host, port, txid = fields
    for name, field in (("host", host), ("port", port), ("txid", txid)):
        if not field:
            return XidInvalid(
                f"XID {_show(raw)} has an empty {name} field (truncated?)", reason="truncated"
            )
    if not port.isdigit() or port.startswith(b"0") or int(port) > 65535:
        return XidInvalid(
            f"XID {_show(raw)} has port {_show(port)}; expected 1-65535", reason="port"
        )
    if not txid.isdigit() or len(txid) > 20:
        return XidInvalid(
            f"XID {_show(raw)} has txid {_show(txid)}; expected 1-20 decimal digits",
            reason="txid",
        )
    return XidInvalid(
        f"XID {_show(raw)} has an invalid host {_show(host)}; expected an IPv4 address, "
        "a DNS name or a bracketed IPv6 address",
        reason="host",
    )


# --- generation ----------------------------------------------------------------------------

# 63-bit txid: 42 bits of milliseconds since EPOCH_MS (139 years), 9 bits of per-process
# randomness, 12 bits of counter (4096 ids per millisecond). When the counter wraps, the
# logical clock moves one millisecond ahead instead of waiting, so ids stay unique and
# increasing within a process at any rate; a restarted process starts from the wall clock and
# a fresh random salt, so it cannot repeat the previous process's ids unless that one ran
# ahead of the wall clock (over 4M ids/s sustained) *and* drew the same salt.
EPOCH_MS: Final = 1_704_067_200_000  # 2024-01-01T00:00:00Z
_TIME_BITS: Final = 42
_SALT_BITS: Final = 9
_COUNTER_BITS: Final = 12
_COUNTER_MAX: Final = (1 << _COUNTER_BITS) - 1


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class TxidGenerator:
    """Issues txids unique across restarts and processes without coordination."""

    def __init__(
        self,
        clock_ms: Callable[[], int] = _wall_ms,
        salt: int | None = None,
    ) -> None:
        if salt is not None and not 0 <= salt < (1 << _SALT_BITS):
            # masking would silently give salts 0 and 512 the same ids
            raise ValueError(f"salt must be in 0..{(1 << _SALT_BITS) - 1}, not {salt}")
        self._clock_ms = clock_ms
        self._salt = (int.from_bytes(os.urandom(2), "big") if salt is None else salt) & (
            (1 << _SALT_BITS) - 1
        )
        self._last_ms = 0
        self._counter = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            now = self._clock_ms() - EPOCH_MS
            if now > self._last_ms:
                self._last_ms = now
                self._counter = 0
            elif self._counter < _COUNTER_MAX:
                self._counter += 1
            else:
                # counter exhausted this millisecond, or the wall clock stepped back:
                # run the logical clock ahead rather than repeat an id
                self._last_ms += 1
                self._counter = 0
            ms = self._last_ms & ((1 << _TIME_BITS) - 1)
            return (
                (ms << (_SALT_BITS + _COUNTER_BITS)) | (self._salt << _COUNTER_BITS) | self._counter
            )


def format_owner(host: str, port: int) -> str:
    """host:port as it appears in an XID (IPv6 bracketed)."""
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def generate(owner_host: str, owner_port: int, generator: TxidGenerator) -> Xid:
    raw = f"{format_owner(owner_host, owner_port)}:{generator.next()}"
    return parse(raw, max_length=max(DEFAULT_MAX_LENGTH, len(raw)))
