"""HMAC-SHA256 request signing, "GTS REST v1" (docs/signing.md): canonical string, sign, verify.

Rules: pure. No I/O, no aiohttp, no clock of its own: the caller passes `now_ms` in. Randomness
(`secrets`) is the only outside input, for nonces and the ephemeral key. The replay check is
not here (it needs a store, see nonces.py): `verify` returns the nonce and the caller checks it
next, and only then parses the body.

Theory of operation. The signer builds a canonical string of nine lines (version, method,
path, sorted query, timestamp, nonce, idempotency key, XID, sha256 of the body) from the
request *exactly as sent* (nothing is decoded or re-serialised, so both ends can rebuild it from
the bytes on the wire), and sends `v1=<hex HMAC-SHA256>` of it with the key id, timestamp and
nonce. The receiver checks, in this order, each failure a `SignatureInvalid` with its reason:
well-formed headers (malformed) → key id known, current or previous (unknown_key) → timestamp
within ±window (stale) → signature, constant-time compare (mismatch). docs/signing.md is the
specification, with test vectors (`VECTORS` below are the same ones).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from sidecar.errors import SignatureInvalid

if TYPE_CHECKING:
    from sidecar.config import SigningConfig

VERSION: Final = "v1"

KEY_ID_HEADER: Final = "x-gts-key-id"
TIMESTAMP_HEADER: Final = "x-gts-timestamp"
NONCE_HEADER: Final = "x-gts-nonce"
SIGNATURE_HEADER: Final = "x-gts-signature"
#: covered by the signature when present (empty line in the canonical string when absent)
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
XID_HEADER: Final = "XID"

#: the four headers every signed request carries, each exactly once
SIGNED_HEADERS: Final = (KEY_ID_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER)
#: optional headers the canonical string covers: at most once each
COVERED_HEADERS: Final = (IDEMPOTENCY_HEADER, XID_HEADER)

DEFAULT_WINDOW_MS: Final = 300_000
#: bytes of randomness in a generated nonce (128 bits → 32 hex characters)
NONCE_BYTES: Final = 16

_KEY_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
# ms since epoch: no sign, no spaces; 15 digits reach the year 33658
_TIMESTAMP_RE: Final = re.compile(r"[0-9]{1,15}")
# >= 128 bits of randomness as lowercase hex; the upper bound keeps replay-store keys small
_NONCE_RE: Final = re.compile(r"[0-9a-f]{32,128}")
_SIGNATURE_RE: Final = re.compile(r"v1=[0-9a-f]{64}")
_FORBIDDEN_RE: Final = re.compile("[\r\n\x00]")
_EMPTY_SHA256: Final = hashlib.sha256(b"").hexdigest()


# --- canonical string ---------------------------------------------------------------------


def canonical_query(raw_query: str) -> str:
    """The `name=value` pairs exactly as sent, split on `&`, empty pairs dropped, sorted by
    their bytes, joined by `&`. Nothing is decoded: `a=%41` and `a=A` sign differently."""
    if not raw_query:
        return ""
    pairs = [p for p in raw_query.split("&") if p]
    pairs.sort(key=_wire_bytes)
    return "&".join(pairs)


def canonical_string(
    method: str,
    raw_path: str,
    raw_query: str,
    timestamp: int | str,
    nonce: str,
    idempotency_key: str | None,
    xid: str | None,
    body: bytes,
) -> bytes:
    """The nine lines the signature covers, joined by LF, no trailing newline.

    Every field is taken as sent: the method as the request line has it (methods are
    case-sensitive), the path percent-encoded, the query without its `?`. A field holding CR,
    LF or NUL would make the string ambiguous, so it is refused with ValueError, as are
    non-ASCII fields, a path holding `?` or `#` and a timestamp that is not decimal.
    """
    ts = str(timestamp) if isinstance(timestamp, int) else timestamp
    if not _TIMESTAMP_RE.fullmatch(ts):
        raise ValueError("timestamp must be decimal milliseconds since the epoch")
    # one search over the fields side by side (joining cannot make a CR, LF or NUL)
    if _FORBIDDEN_RE.search(f"{method}{raw_path}{raw_query}{nonce}{idempotency_key}{xid}"):
        raise ValueError("a signed field contains CR, LF or NUL")
    if not method:
        raise ValueError("empty method")
    if "?" in raw_path or "#" in raw_path:
        raise ValueError("raw_path must be the path alone (no query, no fragment)")
    lines = (
        VERSION,
        method,
        raw_path,
        canonical_query(raw_query),
        ts,
        nonce,
        idempotency_key or "",
        xid or "",
        hashlib.sha256(body).hexdigest() if body else _EMPTY_SHA256,
    )
    return _wire_bytes("\n".join(lines))


def _wire_bytes(text: str) -> bytes:
    # ASCII only: a non-ASCII header byte decodes differently on each side (aiohttp encodes
    # UTF-8, a receiver may decode Latin-1), which would turn into an unexplained mismatch.
    # Paths and queries are percent-encoded on the wire; XIDs and keys are ASCII anyway.
    try:
        return text.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("a signed field contains non-ASCII characters") from None


def signature(secret: bytes, canonical: bytes) -> str:
    """`v1=<lowercase hex HMAC-SHA256>`: the value of x-gts-signature."""
    return f"{VERSION}={hmac.new(secret, canonical, hashlib.sha256).hexdigest()}"


# --- keys ---------------------------------------------------------------------------------


class KeyRing:
    """The current signing key and the previous keys that still verify (rotation).

    Without a current key, a random 32-byte one is made with key id `ephemeral-<8 hex>` and
    `ephemeral` is True: this process then signs and verifies only its own requests.
    Secrets never appear in repr.
    """

    __slots__ = ("key_id", "ephemeral", "_secret", "_keys")

    def __init__(
        self,
        current: tuple[str, bytes] | None,
        previous: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        self.ephemeral = current is None
        if current is None:
            current = (f"ephemeral-{secrets.token_hex(4)}", secrets.token_bytes(32))
        keys: dict[str, bytes] = {}
        for key_id, secret in (current, *previous):
            if not _KEY_ID_RE.fullmatch(key_id):
                raise ValueError(f"invalid signing key id {key_id!r}")
            if not secret:
                raise ValueError(f"signing key {key_id!r} has an empty secret")
            if key_id in keys:
                raise ValueError(f"signing key id {key_id!r} appears twice")
            keys[key_id] = secret
        self.key_id: str = current[0]
        self._secret: bytes = current[1]
        self._keys = keys

    @classmethod
    def from_config(cls, cfg: SigningConfig) -> KeyRing:
        """Secrets are the files' text (UTF-8, surrounding whitespace stripped) as key bytes."""
        current = None
        if cfg.key_id is not None and cfg.secret_file is not None:
            current = (cfg.key_id, cfg.secret_file.reveal().encode())
        previous = [(k.key_id, k.secret_file.reveal().encode()) for k in cfg.previous]
        return cls(current, previous)

    def replace(self, other: KeyRing) -> None:
        """Take `other`'s keys in place (a reload rotating keys): everything that holds this
        ring signs with the new current key and verifies against the new set from its next
        call on, with no restart."""
        self.key_id, self._secret, self._keys = other.key_id, other._secret, other._keys
        self.ephemeral = other.ephemeral

    @property
    def secret(self) -> bytes:
        """The current key's secret (to sign with)."""
        return self._secret

    def lookup(self, key_id: str) -> bytes | None:
        """The secret that verifies `key_id`: current or previous; None when unknown."""
        return self._keys.get(key_id)

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def __repr__(self) -> str:
        kind = "ephemeral" if self.ephemeral else "configured"
        return f"KeyRing(key_id={self.key_id!r}, {kind}, verifies={list(self._keys)!r})"


# --- sign ---------------------------------------------------------------------------------


class _NonceSource:
    """128 random bits per nonce, from the OS CSPRNG in 4 KiB reads (one getrandom call per
    256 nonces instead of one each: a signed call is on every transaction's path)."""

    _READ: Final = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool = b""
        self._at = 0

    def __call__(self) -> str:
        with self._lock:
            if self._at + NONCE_BYTES > len(self._pool):
                self._pool, self._at = os.urandom(self._READ), 0
            at = self._at
            self._at = at + NONCE_BYTES
            return self._pool[at : at + NONCE_BYTES].hex()


new_nonce: Final = _NonceSource()


def sign_headers(
    ring: KeyRing,
    method: str,
    raw_path: str,
    raw_query: str,
    body: bytes,
    *,
    now_ms: int,
    nonce: str | None = None,
    idempotency_key: str | None = None,
    xid: str | None = None,
) -> dict[str, str]:
    """The four x-gts-* headers for a request signed with the ring's current key. The caller
    sends `idempotency_key` and `xid` (if any) as the Idempotency-Key and XID headers."""
    if nonce is None:
        nonce = new_nonce()
    elif not _NONCE_RE.fullmatch(nonce):
        raise ValueError("nonce must be 32 to 128 lowercase hex characters")
    ts = str(now_ms)
    canonical = canonical_string(method, raw_path, raw_query, ts, nonce, idempotency_key, xid, body)
    return {
        KEY_ID_HEADER: ring.key_id,
        TIMESTAMP_HEADER: ts,
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: signature(ring.secret, canonical),
    }


# --- verify -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verified:
    """A request whose signature checked out. Its nonce still has to pass the replay store."""

    key_id: str
    nonce: str
    #: ms since epoch, as the signer sent it
    timestamp: int


Headers = Mapping[str, str] | Iterable[tuple[str, str]]

_WATCHED: Final = {h.lower(): h for h in SIGNED_HEADERS + COVERED_HEADERS}
#: the same names as raw lower-case bytes, to pick a request's headers before decoding them
WATCHED_RAW: Final = frozenset(name.encode("latin-1") for name in _WATCHED)


def _collect(headers: Headers) -> dict[str, str]:
    """The signed and covered headers, by lower-case name. A multidict's items() yields every
    occurrence, so a repeated header is seen; a plain dict cannot carry one."""
    pairs: Iterable[tuple[str, str]] = headers.items() if isinstance(headers, Mapping) else headers
    found: dict[str, str] = {}
    for name, value in pairs:
        lname = name.lower()
        if lname not in _WATCHED:
            continue
        if lname in found:
            raise SignatureInvalid(
                f"header {_WATCHED[lname]} appears more than once", reason="malformed"
            )
        if _FORBIDDEN_RE.search(value):
            raise SignatureInvalid(
                f"header {_WATCHED[lname]} contains CR, LF or NUL", reason="malformed"
            )
        found[lname] = value
    return found


def verify(
    ring: KeyRing,
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Headers,
    body: bytes,
    *,
    now_ms: int,
    window_ms: int | float = DEFAULT_WINDOW_MS,
) -> Verified:
    """Check a received request's signature; raise SignatureInvalid (reason malformed,
    unknown_key, stale or mismatch, checked in that order) or return what the replay check
    needs. `headers` is the request's multidict (or its (name, value) pairs): a dict would
    hide a repeated header."""
    found = _collect(headers)
    missing = [h for h in SIGNED_HEADERS if h not in found]
    if missing:
        raise SignatureInvalid(
            f"missing signed header(s): {', '.join(missing)}", reason="malformed"
        )
    key_id = found[KEY_ID_HEADER]
    ts = found[TIMESTAMP_HEADER]
    nonce = found[NONCE_HEADER]
    if not _KEY_ID_RE.fullmatch(key_id):
        raise SignatureInvalid(f"{KEY_ID_HEADER} is not a key id", reason="malformed")
    if not _TIMESTAMP_RE.fullmatch(ts):
        raise SignatureInvalid(
            f"{TIMESTAMP_HEADER} must be decimal milliseconds since the epoch", reason="malformed"
        )
    if not _NONCE_RE.fullmatch(nonce):
        raise SignatureInvalid(
            f"{NONCE_HEADER} must be 32 to 128 lowercase hex characters", reason="malformed"
        )
    if not _SIGNATURE_RE.fullmatch(found[SIGNATURE_HEADER]):
        raise SignatureInvalid(
            f"{SIGNATURE_HEADER} must be v1=<64 lowercase hex characters>", reason="malformed"
        )
    try:
        canonical = canonical_string(
            method,
            raw_path,
            raw_query,
            ts,
            nonce,
            found.get(IDEMPOTENCY_HEADER.lower()),
            found.get(XID_HEADER.lower()),
            body,
        )
    except ValueError as exc:
        raise SignatureInvalid(f"request cannot be signed: {exc}", reason="malformed") from None

    secret = ring.lookup(key_id)
    if secret is None:
        raise SignatureInvalid(f"unknown signing key id {key_id!r}", reason="unknown_key")

    timestamp = int(ts)
    skew = timestamp - now_ms
    if abs(skew) > window_ms:
        direction = "in the future" if skew > 0 else "in the past"
        raise SignatureInvalid(
            f"timestamp is {abs(skew) / 1000:.3f}s {direction} "
            f"(allowed: ±{window_ms / 1000:g}s); check the clocks (NTP)",
            reason="stale",
        )

    expected = signature(secret, canonical)
    if not hmac.compare_digest(expected, found[SIGNATURE_HEADER]):
        raise SignatureInvalid("signature does not match the request", reason="mismatch")
    return Verified(key_id=key_id, nonce=nonce, timestamp=timestamp)


# --- test vectors (the same as docs/signing.md; tests/unit/test_signing.py replays them) ----


@dataclass(frozen=True, slots=True)
class Vector:
    name: str
    secret: bytes
    key_id: str
    method: str
    path: str
    query: str
    timestamp: int
    nonce: str
    idempotency_key: str | None
    xid: str | None
    body: bytes
    canonical: bytes
    signature: str


_EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

#: fixed requests and their exact signatures; checked independently with
#: `printf '%s' "$CANONICAL" | openssl dgst -sha256 -hmac "$SECRET"` (see docs/signing.md)
VECTORS: Final[tuple[Vector, ...]] = (
    Vector(
        name="begin",
        secret=b"gts-test-key-1-0123456789abcdef",
        key_id="test-2024-01",
        method="POST",
        path="/api/v1/transaction/start",
        query="",
        timestamp=1700000000000,
        nonce="00112233445566778899aabbccddeeff",
        idempotency_key="begin-create-order-0001",
        xid=None,
        body=b'{"name":"create-order","timeoutMs":60000}',
        canonical=(
            b"v1\nPOST\n/api/v1/transaction/start\n\n1700000000000\n"
            b"00112233445566778899aabbccddeeff\nbegin-create-order-0001\n\n"
            b"8e8801feda1fca589c98782aa9dc76498607696a2bfcdb862a50e09f3e0f7a88"
        ),
        signature="v1=4c9c0e1eb028db8c1d5e7fe60d3d13fde1bfb384ecc972b01c398ce1c84c0a91",
    ),
    Vector(
        name="status",
        secret=b"gts-test-key-1-0123456789abcdef",
        key_id="test-2024-01",
        method="GET",
        path="/api/v1/transaction/10.0.0.5%3A8091%3A42",
        query="b=2&a=1&a=0",
        timestamp=1700000000123,
        nonce="0f1e2d3c4b5a69788796a5b4c3d2e1f0",
        idempotency_key=None,
        xid=None,
        body=b"",
        canonical=(
            b"v1\nGET\n/api/v1/transaction/10.0.0.5%3A8091%3A42\na=0&a=1&b=2\n"
            b"1700000000123\n0f1e2d3c4b5a69788796a5b4c3d2e1f0\n\n\n" + _EMPTY.encode()
        ),
        signature="v1=37126c510888e538cef3bb06cc252f03d05572c48a7cf820103e5facea797e33",
    ),
    Vector(
        name="callback",
        secret=b"gts-test-key-0-fedcba9876543210",
        key_id="test-2023-12",
        method="POST",
        path="/gts/v1/branch/7001/commit",
        query="",
        timestamp=1700000060000,
        nonce="a3c5e7f90b1d2f4a6c8e0a2b4d6f8091",
        idempotency_key="10.0.0.5:8091:42:7001:commit",
        xid="10.0.0.5:8091:42",
        body=b"",
        canonical=(
            b"v1\nPOST\n/gts/v1/branch/7001/commit\n\n1700000060000\n"
            b"a3c5e7f90b1d2f4a6c8e0a2b4d6f8091\n10.0.0.5:8091:42:7001:commit\n"
            b"10.0.0.5:8091:42\n" + _EMPTY.encode()
        ),
        signature="v1=5465a266ca548a1761de566149f807fa92e01a7b43245c605d1f691ca4d12878",
    ),
    Vector(
        name="query-edge",
        secret=b"gts-test-key-1-0123456789abcdef",
        key_id="test-2024-01",
        method="GET",
        path="/api/v1/transaction/%5B2001%3Adb8%3A%3A1%5D%3A8091%3A9",
        query="&z=1&&flag&Z=2&a=%41",
        timestamp=1700000000999,
        nonce="fedcba98765432100123456789abcdef",
        idempotency_key=None,
        xid="[2001:db8::1]:8091:9",
        body=b"",
        canonical=(
            b"v1\nGET\n/api/v1/transaction/%5B2001%3Adb8%3A%3A1%5D%3A8091%3A9\n"
            b"Z=2&a=%41&flag&z=1\n1700000000999\nfedcba98765432100123456789abcdef\n\n"
            b"[2001:db8::1]:8091:9\n" + _EMPTY.encode()
        ),
        signature="v1=e9ec7e9e12b9cf21105285e15d85c9aebf8cf74d0501461feca00cfe10898522",
    ),
)
