"""Unit and property tests for sidecar/coordinator/signing.py and nonces.py (docs/signing.md)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from multidict import CIMultiDict

from sidecar.config import SigningConfig
from sidecar.coordinator import signing
from sidecar.coordinator.nonces import MemoryNonceStore, check_replay, nonce_ttl
from sidecar.coordinator.signing import (
    VECTORS,
    KeyRing,
    Verified,
    canonical_string,
    sign_headers,
    verify,
)
from sidecar.errors import SignatureInvalid
from sidecar.schema import validate

REASONS = frozenset({"unknown_key", "stale", "mismatch", "replay", "malformed"})
NOW = 1_700_000_000_000
WINDOW = 300_000
SECRET = b"unit-test-secret-0123456789abcdef"
RING = KeyRing(("unit-1", SECRET))
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Req:
    method: str = "POST"
    path: str = "/api/v1/transaction/start"
    query: str = ""
    body: bytes = b'{"name":"create-order","timeoutMs":60000}'
    idempotency_key: str | None = None
    xid: str | None = None


def signed(
    req: Req, ring: KeyRing = RING, *, now_ms: int = NOW, nonce: str | None = None
) -> list[tuple[str, str]]:
    """The request's headers as a client sends them: x-gts-*, then Idempotency-Key and XID."""
    headers = list(
        sign_headers(
            ring,
            req.method,
            req.path,
            req.query,
            req.body,
            now_ms=now_ms,
            nonce=nonce,
            idempotency_key=req.idempotency_key,
            xid=req.xid,
        ).items()
    )
    if req.idempotency_key is not None:
        headers.append(("Idempotency-Key", req.idempotency_key))
    if req.xid is not None:
        headers.append(("XID", req.xid))
    return headers


def check(
    req: Req,
    headers: object,
    ring: KeyRing = RING,
    *,
    now_ms: int = NOW,
    window_ms: int = WINDOW,
) -> Verified:
    return verify(
        ring,
        req.method,
        req.path,
        req.query,
        headers,  # type: ignore[arg-type]
        req.body,
        now_ms=now_ms,
        window_ms=window_ms,
    )


def refused(req: Req, headers: object, reason: str, **kw: object) -> SignatureInvalid:
    with pytest.raises(SignatureInvalid) as info:
        check(req, headers, **kw)  # type: ignore[arg-type]
    err = info.value
    assert err.reason == reason, err.message
    assert err.reason in REASONS
    assert err.status == 401 and err.code == "SIGNATURE_INVALID"
    assert not _CONTROL_CHARS.search(err.message), err.message
    return err


def replace_header(headers: list[tuple[str, str]], name: str, value: str) -> list[tuple[str, str]]:
    return [(n, value if n.lower() == name.lower() else v) for n, v in headers]


# --- test vectors -------------------------------------------------------------------------


def test_there_are_vectors_covering_the_brief() -> None:
    names = {v.name for v in VECTORS}
    assert {"begin", "status", "callback"} <= names
    assert len(VECTORS) >= 3


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v.name)
def test_vector_canonical_string_and_signature(v: signing.Vector) -> None:
    canonical = canonical_string(
        v.method, v.path, v.query, v.timestamp, v.nonce, v.idempotency_key, v.xid, v.body
    )
    assert canonical == v.canonical
    assert canonical.count(b"\n") == 8 and not canonical.endswith(b"\n")
    # independently of the module: HMAC-SHA256 of the literal canonical string
    assert v.signature == "v1=" + hmac.new(v.secret, v.canonical, hashlib.sha256).hexdigest()
    assert signing.signature(v.secret, canonical) == v.signature


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v.name)
def test_vector_sign_and_verify(v: signing.Vector) -> None:
    ring = KeyRing((v.key_id, v.secret))
    req = Req(v.method, v.path, v.query, v.body, v.idempotency_key, v.xid)
    headers = signed(req, ring, now_ms=v.timestamp, nonce=v.nonce)
    assert dict(headers[:4]) == {
        "x-gts-key-id": v.key_id,
        "x-gts-timestamp": str(v.timestamp),
        "x-gts-nonce": v.nonce,
        "x-gts-signature": v.signature,
    }
    assert check(req, headers, ring, now_ms=v.timestamp) == Verified(v.key_id, v.nonce, v.timestamp)


def test_vectors_are_in_the_docs() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "signing.md").read_text(encoding="utf-8")
    for v in VECTORS:
        assert v.signature in doc, v.name
        assert v.canonical.decode() in doc, v.name


# --- canonical string ---------------------------------------------------------------------


def test_canonical_string_layout() -> None:
    c = canonical_string("PUT", "/a%2Fb", "y=2&x=1", 5, "ab" * 16, "k", "h:1:2", b"x")
    assert c.split(b"\n") == [
        b"v1",
        b"PUT",
        b"/a%2Fb",
        b"x=1&y=2",
        b"5",
        b"ab" * 16,
        b"k",
        b"h:1:2",
        hashlib.sha256(b"x").hexdigest().encode(),
    ]


def test_query_sorted_bytewise_empty_pairs_dropped_nothing_decoded() -> None:
    assert signing.canonical_query("") == ""
    assert signing.canonical_query("&&") == ""
    assert signing.canonical_query("b=2&a=1&a=0") == "a=0&a=1&b=2"
    assert signing.canonical_query("z=1&Z=1&_=1&a=%41") == "Z=1&_=1&a=%41&z=1"
    assert signing.canonical_query("a=%41") != signing.canonical_query("a=A")


@pytest.mark.parametrize(
    "field, value",
    [
        ("method", "GE\nT"),
        ("raw_path", "/a\rb"),
        ("raw_query", "a=\x00"),
        ("nonce", "ab\n" * 11),
        ("idempotency_key", "k\r\nx"),
        ("xid", "h:1:2\n"),
        ("raw_path", "/a?b=1"),
        ("raw_path", "/a#frag"),
        ("raw_path", "/caf\u00e9"),
        ("xid", "h\u00e9:1:2"),
        ("method", ""),
        ("timestamp", "12a"),
        ("timestamp", "-5"),
    ],
)
def test_canonical_string_refuses_ambiguous_fields(field: str, value: str) -> None:
    args: dict[str, object] = dict(
        method="GET",
        raw_path="/p",
        raw_query="",
        timestamp=1,
        nonce="ab" * 16,
        idempotency_key=None,
        xid=None,
        body=b"",
    )
    args[field] = value
    with pytest.raises(ValueError):
        canonical_string(**args)  # type: ignore[arg-type]


# --- property tests -----------------------------------------------------------------------

_TCHAR = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_VISIBLE = "".join(chr(c) for c in range(0x21, 0x7F))
_PATH_CHARS = _VISIBLE.replace("?", "").replace("#", "")
_QUERY_CHARS = _VISIBLE.replace("&", "").replace("#", "")
_VALUE_CHARS = " \t" + _VISIBLE

methods = st.text(alphabet=_TCHAR, min_size=1, max_size=12)
paths = st.text(alphabet=_PATH_CHARS, max_size=60).map(lambda p: "/" + p)
queries = st.lists(st.text(alphabet=_QUERY_CHARS, max_size=12), max_size=6).map("&".join)
bodies = st.binary(max_size=512)
opt_values = st.none() | st.text(alphabet=_VALUE_CHARS, min_size=1, max_size=40)
requests = st.builds(
    Req,
    method=methods,
    path=paths,
    query=queries,
    body=bodies,
    idempotency_key=opt_values,
    xid=opt_values,
)


@given(req=requests, skew=st.integers(-WINDOW, WINDOW))
def test_sign_verify_round_trip(req: Req, skew: int) -> None:
    headers = signed(req, now_ms=NOW + skew)
    got = check(req, headers)
    assert got.key_id == "unit-1" and got.timestamp == NOW + skew
    assert re.fullmatch(r"[0-9a-f]{32}", got.nonce)
    # a multidict (what aiohttp gives a handler), any header-name case
    assert check(req, CIMultiDict((n.upper(), v) for n, v in headers)) == got


@given(req=requests, data=st.data())
def test_query_order_does_not_matter(req: Req, data: st.DataObject) -> None:
    pairs = req.query.split("&")
    shuffled = data.draw(st.permutations(pairs))
    headers = signed(req)
    check(replace(req, query="&".join(shuffled)), headers)


def _mutate_char(text: str, data: st.DataObject, alphabet: str) -> str:
    i = data.draw(st.integers(0, len(text) - 1), label="position")
    new = data.draw(st.sampled_from(alphabet.replace(text[i], "")), label="new char")
    return text[:i] + new + text[i + 1 :]


_ALNUM = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@given(req=requests, data=st.data())
def test_any_single_byte_change_is_a_mismatch(req: Req, data: st.DataObject) -> None:
    headers = signed(req, now_ms=NOW)
    field = data.draw(
        st.sampled_from(
            ["method", "path", "query", "timestamp", "nonce", "idempotency_key", "xid", "body"]
        ),
        label="field",
    )
    tampered_req, tampered = req, headers
    if field == "method":
        tampered_req = replace(req, method=_mutate_char(req.method, data, _TCHAR))
    elif field == "path":
        tampered_req = replace(req, path=_mutate_char(req.path, data, _PATH_CHARS))
    elif field == "query":
        # change one byte of a value (or append a pair when there is none)
        pairs = [p for p in req.query.split("&") if p]
        if not pairs:
            tampered_req = replace(req, query="a=1")
        else:
            i = data.draw(st.integers(0, len(pairs) - 1))
            name, eq, value = pairs[i].partition("=")
            value = _mutate_char(value, data, _ALNUM) if value else "x"
            pairs[i] = f"{name}={value}" if eq or name else value
            tampered_req = replace(req, query="&".join(pairs))
    elif field == "timestamp":
        ts = dict(headers)["x-gts-timestamp"]
        tampered = replace_header(headers, "x-gts-timestamp", _mutate_char(ts, data, "0123456789"))
    elif field == "nonce":
        nonce = dict(headers)["x-gts-nonce"]
        tampered = replace_header(
            headers, "x-gts-nonce", _mutate_char(nonce, data, "0123456789abcdef")
        )
    elif field in ("idempotency_key", "xid"):
        name = "Idempotency-Key" if field == "idempotency_key" else "XID"
        old = getattr(req, field)
        if old is None:  # adding one byte to an absent header
            new = data.draw(st.sampled_from(_ALNUM))
            tampered = [*headers, (name, new)]
        else:
            new = _mutate_char(old, data, _ALNUM)
            tampered = replace_header(headers, name, new)
        if field == "xid":
            tampered_req = replace(req, xid=new)
        else:
            tampered_req = replace(req, idempotency_key=new)
    else:
        if req.body:
            i = data.draw(st.integers(0, len(req.body) - 1))
            bit = data.draw(st.integers(0, 7))
            body = bytearray(req.body)
            body[i] ^= 1 << bit
            tampered_req = replace(req, body=bytes(body))
        else:
            tampered_req = replace(req, body=data.draw(st.binary(min_size=1, max_size=1)))
    assume(tampered_req != req or tampered != headers)
    refused(tampered_req, tampered, "mismatch", window_ms=10**16)


# --- freshness ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "skew_ms, ok, direction",
    [
        (-WINDOW, True, ""),
        (-WINDOW - 1, False, "in the past"),
        (WINDOW, True, ""),
        (WINDOW + 1, False, "in the future"),
        (0, True, ""),
    ],
)
def test_window_boundaries(skew_ms: int, ok: bool, direction: str) -> None:
    req = Req()
    headers = signed(req, now_ms=NOW + skew_ms)
    if ok:
        check(req, headers)
    else:
        err = refused(req, headers, "stale")
        assert direction in err.message
        assert "300.001s" in err.message


# --- keys and rotation --------------------------------------------------------------------


def test_unknown_key() -> None:
    other = KeyRing(("other-1", SECRET))
    err = refused(Req(), signed(Req(), other), "unknown_key")
    assert "other-1" in err.message


def test_rotation_previous_key_verifies_until_removed() -> None:
    old = KeyRing(("k-2023", b"old-secret-0123456789abcdef0123"))
    rotated = KeyRing(
        ("k-2024", b"new-secret-0123456789abcdef0123"),
        [("k-2023", b"old-secret-0123456789abcdef0123")],
    )
    done = KeyRing(("k-2024", b"new-secret-0123456789abcdef0123"))
    req = Req(xid="10.0.0.5:8091:42")
    from_old = signed(req, old)
    assert check(req, from_old, rotated).key_id == "k-2023"
    refused(req, from_old, "unknown_key", ring=done)
    # the rotated ring signs with its current key, which the old ring does not know yet
    from_new = signed(req, rotated)
    assert dict(from_new)["x-gts-key-id"] == "k-2024"
    assert check(req, from_new, done).key_id == "k-2024"
    refused(req, from_new, "unknown_key", ring=old)
    # a previous key id with a different secret is a mismatch, not a pass
    forged = KeyRing(("k-2023", b"not-the-secret-0123456789abcdef"))
    refused(req, signed(req, forged), "mismatch", ring=rotated)


def test_ephemeral_ring() -> None:
    a, b = KeyRing(None), KeyRing(None)
    assert a.ephemeral and b.ephemeral
    assert re.fullmatch(r"ephemeral-[0-9a-f]{8}", a.key_id)
    assert len(a.secret) == 32 and a.secret != b.secret
    check(Req(), signed(Req(), a), a)
    refused(Req(), signed(Req(), a), "unknown_key", ring=b)
    assert not KeyRing(("k", b"s")).ephemeral


def test_ring_from_config(tmp_path: Path) -> None:
    cur, old = tmp_path / "cur", tmp_path / "old"
    cur.write_text("current-secret-0123456789abcdef\n")
    old.write_text("previous-secret-0123456789abcdef")
    cfg = validate(
        SigningConfig,
        {
            "key_id": "k-2024",
            "secret_file": str(cur),
            "previous": [{"key_id": "k-2023", "secret_file": str(old)}],
            "window": "2m",
        },
    )
    ring = KeyRing.from_config(cfg)
    assert not ring.ephemeral and ring.key_id == "k-2024"
    assert ring.secret == b"current-secret-0123456789abcdef"
    assert ring.lookup("k-2023") == b"previous-secret-0123456789abcdef"
    assert ring.lookup("nope") is None and ring.key_ids == ("k-2024", "k-2023")
    assert "secret-0123" not in repr(ring)
    eph = KeyRing.from_config(SigningConfig())
    assert eph.ephemeral and eph.key_ids == (eph.key_id,)


def test_ring_refuses_bad_keys() -> None:
    with pytest.raises(ValueError):
        KeyRing(("k", b""))
    with pytest.raises(ValueError):
        KeyRing(("k", b"a"), [("k", b"b")])
    with pytest.raises(ValueError):
        KeyRing(("bad id", b"a"))


def test_sign_headers_generates_fresh_nonces_and_refuses_bad_ones() -> None:
    a, b = signed(Req()), signed(Req())
    assert dict(a)["x-gts-nonce"] != dict(b)["x-gts-nonce"]
    assert re.fullmatch(r"v1=[0-9a-f]{64}", dict(a)["x-gts-signature"])
    with pytest.raises(ValueError):
        sign_headers(RING, "GET", "/", "", b"", now_ms=NOW, nonce="ABCDEF" * 6)
    with pytest.raises(ValueError):
        sign_headers(RING, "GET", "/", "", b"", now_ms=NOW, nonce="ab" * 8)


# --- malformed ----------------------------------------------------------------------------

_ALL_COVERED = ("x-gts-key-id", "x-gts-timestamp", "x-gts-nonce", "x-gts-signature")
_REQ_FULL = Req(idempotency_key="idem-1", xid="10.0.0.5:8091:42")


@pytest.mark.parametrize("name", [*_ALL_COVERED, "Idempotency-Key", "XID"])
@pytest.mark.parametrize("bad", ["\r", "\n", "\x00"])
def test_cr_lf_nul_in_a_signed_header_is_malformed(name: str, bad: str) -> None:
    headers = signed(_REQ_FULL)
    value = dict(headers)[name]
    err = refused(
        _REQ_FULL, replace_header(headers, name, value[:3] + bad + value[3:]), "malformed"
    )
    assert name in err.message


@pytest.mark.parametrize("name", [*_ALL_COVERED, "Idempotency-Key", "XID"])
def test_duplicated_signed_header_is_malformed(name: str) -> None:
    headers = signed(_REQ_FULL)
    value = dict(headers)[name]
    # even with the same value, and under another case
    err = refused(_REQ_FULL, [*headers, (name.upper(), value)], "malformed")
    assert "more than once" in err.message
    refused(_REQ_FULL, CIMultiDict([*headers, (name.lower(), value)]), "malformed")


@pytest.mark.parametrize("name", _ALL_COVERED)
def test_missing_signed_header_is_malformed(name: str) -> None:
    headers = [(n, v) for n, v in signed(Req()) if n != name]
    err = refused(Req(), headers, "malformed")
    assert name in err.message


@pytest.mark.parametrize(
    "name, value",
    [
        ("x-gts-timestamp", "-1700000000000"),
        ("x-gts-timestamp", " 1700000000000"),
        ("x-gts-timestamp", "1700000000000.0"),
        ("x-gts-timestamp", "1" * 16),
        ("x-gts-timestamp", ""),
        ("x-gts-nonce", "0123456789abcdef"),  # 64 bits: too few
        ("x-gts-nonce", "0123456789ABCDEF0123456789ABCDEF"),
        ("x-gts-nonce", "g" * 32),
        ("x-gts-nonce", "a" * 129),
        ("x-gts-signature", "v1=" + "A" * 64),
        ("x-gts-signature", "v2=" + "a" * 64),
        ("x-gts-signature", "a" * 64),
        ("x-gts-signature", "v1=" + "a" * 63),
        ("x-gts-signature", "v1=" + "a" * 64 + ",v2=b"),
        ("x-gts-key-id", "bad key"),
        ("x-gts-key-id", ""),
    ],
)
def test_malformed_values(name: str, value: str) -> None:
    refused(Req(), replace_header(signed(Req()), name, value), "malformed")


def test_unencodable_request_is_malformed_not_a_crash() -> None:
    req = Req()
    headers = signed(req)
    refused(replace(req, path="/caf\u00e9"), headers, "malformed")
    refused(replace(req, path="/a?b"), headers, "malformed")
    refused(req, [*headers, ("XID", "h\u00e9:1:2")], "malformed")


def test_a_plain_dict_of_headers_is_accepted() -> None:
    req = Req()
    assert check(req, dict(signed(req))).key_id == "unit-1"


# --- check order --------------------------------------------------------------------------


def test_order_malformed_before_unknown_key() -> None:
    headers = signed(Req(), KeyRing(("other", SECRET)))
    refused(Req(), replace_header(headers, "x-gts-nonce", "short"), "malformed")


def test_order_unknown_key_before_stale() -> None:
    headers = signed(Req(), KeyRing(("other", SECRET)), now_ms=NOW - 10 * WINDOW)
    refused(Req(), headers, "unknown_key")


def test_order_unknown_key_before_mismatch() -> None:
    headers = signed(Req(), KeyRing(("other", SECRET)))
    refused(replace(Req(), body=b"tampered"), headers, "unknown_key")


def test_order_stale_before_mismatch() -> None:
    headers = signed(Req(), now_ms=NOW - WINDOW - 1)
    refused(replace(Req(), body=b"tampered"), headers, "stale")
    headers = replace_header(
        signed(Req(), now_ms=NOW + WINDOW + 1), "x-gts-signature", "v1=" + "0" * 64
    )
    refused(Req(), headers, "stale")


# --- replay store -------------------------------------------------------------------------


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def test_nonce_first_seen_then_replay() -> None:
    store = MemoryNonceStore()
    assert await store.seen("k", "n1", 600) is False
    assert await store.seen("k", "n1", 600) is True
    assert await store.seen("k2", "n1", 600) is False  # per key id
    assert await store.seen("k", "n2", 600) is False


async def test_nonce_expiry_with_injected_clock() -> None:
    clock = FakeClock()
    store = MemoryNonceStore(clock=clock)
    assert not await store.seen("k", "n", 10)
    clock.t += 9.999
    assert await store.seen("k", "n", 10)
    clock.t += 0.001  # exactly the TTL: forgotten
    assert not await store.seen("k", "n", 10)
    assert await store.seen("k", "n", 10)  # and recorded again
    clock.t += 100
    assert not await store.seen("k", "other", 10)
    assert len(store) == 1  # the expired entry was purged


async def test_nonce_expiry_with_mixed_ttls() -> None:
    clock = FakeClock()
    store = MemoryNonceStore(clock=clock)
    await store.seen("k", "long", 100)
    await store.seen("k", "short", 1)
    clock.t += 2
    assert not await store.seen("k", "short", 1)  # expired behind a live entry
    assert await store.seen("k", "long", 100)


async def test_nonce_store_is_bounded_and_evicts_the_oldest() -> None:
    store = MemoryNonceStore(clock=FakeClock(), max_entries=3)
    for n in ("a", "b", "c", "d"):
        assert not await store.seen("k", n, 600)
    assert len(store) == 3 and store.evictions == 1
    assert await store.seen("k", "d", 600)
    assert await store.seen("k", "b", 600)
    assert not await store.seen("k", "a", 600)  # evicted: forgotten
    with pytest.raises(ValueError):
        MemoryNonceStore(max_entries=0)


async def test_nonce_check_and_record_is_atomic() -> None:
    store = MemoryNonceStore()
    results = await asyncio.gather(*(store.seen("k", "same", 600) for _ in range(100)))
    assert results.count(False) == 1


async def test_check_replay_after_verify() -> None:
    store = MemoryNonceStore()
    req = Req()
    headers = signed(req)
    verified = check(req, headers)
    await check_replay(store, verified, window_s=300)
    again = check(req, headers)  # the signature is still fine: only the store can tell
    with pytest.raises(SignatureInvalid) as info:
        await check_replay(store, again, window_s=300)
    assert info.value.reason == "replay"
    assert nonce_ttl(300) == 600


async def test_replay_ttl_covers_the_whole_window() -> None:
    # first seen at the earliest acceptable moment, replayed at the latest: still refused
    clock = FakeClock(0.0)
    store = MemoryNonceStore(clock=clock)
    req = Req()
    ts = NOW
    headers = signed(req, now_ms=ts)
    first = check(req, headers, now_ms=ts - WINDOW)
    await check_replay(store, first, window_s=WINDOW / 1000)
    clock.t += 2 * WINDOW / 1000 - 0.001
    replayed = check(req, headers, now_ms=ts + WINDOW)
    with pytest.raises(SignatureInvalid):
        await check_replay(store, replayed, window_s=WINDOW / 1000)
