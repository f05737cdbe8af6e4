"""sidecar.proxy.h2_fields against h2's own inbound validation: for any request head drawn
from well-formed and malformed fields, one refuses exactly when the other does."""

from __future__ import annotations

import itertools

import h2.exceptions
from h2.utilities import HeaderValidationFlags, validate_headers
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.proxy.h2_fields import MAX_KNOWN, MAX_KNOWN_FIELD, request_error

REQUEST = HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)
PSEUDO = [b":method", b":scheme", b":authority", b":path", b":protocol", b":status", b":foo"]
NAMES = [*PSEUDO, b"host", b"te", b"x-a", b"content-type", b"connection", b"keep-alive",
         b"proxy-connection", b"transfer-encoding", b"upgrade", b"X-Up", b"x a", b"x:a",
         b"x\x7fa", b"x\xc3\xa9", b"", b"\x00", b"x-\t"]  # fmt: skip
VALUES = [b"GET", b"POST", b"CONNECT", b"http", b"/x", b"", b"a", b"b", b"trailers",
          b"Trailers", b"gzip", b"a b", b" a", b"a ", b"\ta", b"a\t", b"a\rb", b"a\nb",
          b"a\x00b", b"\x7f", b"caf\xc3\xa9", b"websocket"]  # fmt: skip
GOOD = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/x")]

field = st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES))
# mostly near-valid heads: a valid one with fields inserted, dropped or replaced
head = st.builds(
    lambda base, extra, at, drop: (
        [f for i, f in enumerate(base) if i != drop][:at]
        + extra
        + [f for i, f in enumerate(base) if i != drop][at:]
    ),
    st.just(GOOD),
    st.lists(field, max_size=3),
    st.integers(0, 4),
    st.integers(-1, 4),
) | st.lists(field, max_size=8)


def h2_refuses(fields: list[tuple[bytes, bytes]]) -> bool:
    try:
        list(validate_headers(fields, REQUEST))
    except h2.exceptions.ProtocolError:
        return True
    return False


@settings(max_examples=3000, deadline=None)
@given(head)
def test_refuses_exactly_what_h2_refuses(fields: list[tuple[bytes, bytes]]) -> None:
    assert (request_error(fields) is not None) == h2_refuses(fields), request_error(fields)


def test_a_grpc_head_is_well_formed() -> None:
    fields = [*GOOD, (b"content-type", b"application/grpc"), (b"te", b"trailers"),
              (b"grpc-timeout", b"1S"), (b"xid", b"10.0.0.1:8091:7")]  # fmt: skip
    assert request_error(fields) is None


def test_every_single_field_in_every_place_is_judged_as_h2_judges_it() -> None:
    with_host = [*GOOD[:2], (b":path", b"/x"), (b"host", b"a")]
    known: set[tuple[bytes, bytes]] = set()
    for good, name, value in itertools.product([GOOD, with_host], NAMES, VALUES):
        for at in range(len(good) + 1):
            for drop in (None, *range(len(good))):
                base = [f for i, f in enumerate(good) if i != drop]
                fields = [*base[:at], (name, value), *base[at:]]
                refused = h2_refuses(fields)
                assert (request_error(fields) is not None) == refused, fields
                # and with the fields a connection remembers from the heads before it
                assert (request_error(fields, known) is not None) == refused, fields
    assert 0 < len(known) <= MAX_KNOWN


def test_a_connection_remembers_few_short_fields() -> None:
    known: set[tuple[bytes, bytes]] = set()
    for i in range(3 * MAX_KNOWN):
        assert (
            request_error(
                [*GOOD, (b"x-n", b"%d" % i), (b"x-big", b"v" * 300), (b"x-" + b"n" * 300, b"1")],
                known,
            )
            is None
        )
        assert len(known) <= MAX_KNOWN
    assert all(len(name) + len(value) <= MAX_KNOWN_FIELD for name, value in known)
