"""The normal form rules match paths in (sidecar.paths): examples and properties."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from sidecar.paths import alternative, ambiguous, normalise

UNRESERVED = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"

# paths built from the pieces that matter: separators, dots, params, escapes, letters
pieces = st.sampled_from(
    [b"/", b"//", b".", b"..", b";", b";v=1", b"%", b"%2", b"%2e", b"%2E", b"%2f", b"%2F",
     b"%5c", b"%64", b"%41", b"%7e", b"%25", b"%3b", b"%zz", b"a", b"deduct", b"~", b"-",
     b"\\", b"x y"]
)  # fmt: skip
raw_paths = st.lists(pieces, max_size=12).map(lambda parts: b"/" + b"".join(parts))


def reference(path: bytes) -> bytes:
    """A second, independent reading of the same rules (RFC 3986 §5.2.4 dot removal)."""
    segments = [s.split(b";")[0] for s in path.split(b"/")]
    out = b"/".join(segments)

    def unescape(m: re.Match[bytes]) -> bytes:
        if m.group(1) is None:
            return b"%25"
        byte = int(m.group(1), 16)
        return bytes([byte]) if byte in UNRESERVED else b"%" + m.group(1).upper()

    out = re.sub(rb"%([0-9A-Fa-f]{2})?", unescape, out)
    out = re.sub(rb"/+", b"/", b"/" + out)
    # remove_dot_segments, as the RFC writes it
    inp, res = out, b""
    while inp:
        if inp.startswith(b"/./"):
            inp = inp[2:]
        elif inp == b"/.":
            inp = b"/"
        elif inp.startswith(b"/../"):
            inp = inp[3:]
            res = res[: res.rfind(b"/")] if b"/" in res else b""
        elif inp == b"/..":
            inp = b"/"
            res = res[: res.rfind(b"/")] if b"/" in res else b""
        else:
            nxt = inp.find(b"/", 1)
            seg, inp = (inp, b"") if nxt == -1 else (inp[:nxt], inp[nxt:])
            res += seg
    res = res.rstrip(b"/")
    return res or b"/"


def test_the_reported_bypasses_all_fold_to_the_declared_route() -> None:
    for raw in [
        b"/deduct", b"/deduct/", b"//deduct", b"/./deduct", b"/%64educt", b"/deduct;x",
        b"/a/../deduct", b"/%2e%2E/deduct", b"/deduct/.", b"/x/..;y/deduct", b"///deduct//",
    ]:  # fmt: skip
        assert normalise(raw) == b"/deduct", raw


def test_reserved_escapes_stay_escaped_and_upper_cased() -> None:
    assert normalise(b"/a%2fb") == b"/a%2Fb"
    assert normalise(b"/a%3bb") == b"/a%3Bb"  # an escaped ';' is data, not a parameter
    assert normalise(b"/a%25b") == b"/a%25b"
    assert normalise(b"/%%34%31") == b"/%2541"  # a lone '%' cannot combine with what follows
    assert normalise(b"/") == b"/"
    assert normalise(b"") == b"/"
    assert normalise(b"/../..") == b"/"


def test_a_normal_path_is_returned_as_it_is() -> None:
    path = b"/orders/42/items"
    assert normalise(path) is path


def test_encoded_slashes_are_ambiguous_and_have_an_alternative_reading() -> None:
    assert not ambiguous(b"/deduct/confirm")
    assert ambiguous(b"/deduct%2Fconfirm") and ambiguous(b"/deduct%5cconfirm")
    assert ambiguous(b"/deduct\\confirm")
    assert normalise(b"/deduct%2Fconfirm") == b"/deduct%2Fconfirm"
    assert alternative(b"/deduct%2Fconfirm") == b"/deduct/confirm"
    assert alternative(b"/orders%2F..%2Fadmin") == b"/admin"


@given(raw_paths)
def test_normalise_agrees_with_the_reference(path: bytes) -> None:
    assert normalise(path) == reference(path)


@given(raw_paths)
def test_normal_form_is_idempotent_and_clean(path: bytes) -> None:
    norm = normalise(path)
    assert normalise(norm) == norm
    assert norm.startswith(b"/")
    assert b"//" not in norm and b";" not in norm
    assert norm == b"/" or not norm.endswith(b"/")
    assert b"." not in norm.split(b"/") and b".." not in norm.split(b"/")
    assert re.search(rb"%(?![0-9A-F]{2})", norm) is None  # every '%' starts an escape
    for m in re.finditer(rb"%([0-9A-F]{2})", norm):
        assert int(m.group(1), 16) not in UNRESERVED


@given(st.binary(max_size=40).map(lambda b: b"/" + b))
def test_any_bytes_normalise_idempotently(path: bytes) -> None:
    norm = normalise(path)
    assert normalise(norm) == norm
    assert normalise(alternative(path)) == alternative(path)
