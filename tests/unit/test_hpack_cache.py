"""sidecar.proxy.hpack_cache against plain hpack: the same bytes, fields, tables and errors for
any sequence of blocks (insertions, size updates, evictions, never-indexed fields, limits
lowered between blocks), and repeated blocks answered without decoding or encoding again."""

from __future__ import annotations

from typing import Any

import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.proxy.hpack_cache import BUDGET, FIELD_COST, CachingDecoder, CachingEncoder

# a small pool, so that lists repeat, entries are found again and the table fills and evicts
NAMES = [b":method", b":path", b"content-type", b"grpc-timeout", b"xid", b"x-a", b"x-long"]
VALUES = [
    b"POST",
    b"/pkg.Svc/Echo",
    b"application/grpc",
    b"1S",
    b"127.0.0.1:8091:1",
    b"",
    b"v" * 90,
]

field = st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES))
header_list = st.lists(field, min_size=1, max_size=6)
# one step of a connection's life
step = st.one_of(
    st.tuples(st.just("block"), header_list, st.booleans(), st.booleans()),
    st.tuples(st.just("repeat"), st.integers(0, 20), st.booleans(), st.booleans()),
    st.tuples(st.just("table_size"), st.sampled_from([0, 64, 200, 4096])),
    st.tuples(st.just("list_limit"), st.sampled_from([100, 300, 65536])),
    st.tuples(st.just("allowed_table"), st.sampled_from([0, 64, 200, 4096])),
    st.tuples(st.just("garbage"), st.binary(min_size=1, max_size=12)),
)


def outcome(fn: Any, *args: Any) -> Any:
    try:
        result = fn(*args)
    except Exception as exc:  # noqa: BLE001 (the error's type is what is compared)
        return ("error", type(exc))
    if isinstance(result, list):
        return [(type(h), tuple(h)) for h in result]
    return result


def table_state(coder: Any) -> Any:
    table = coder.header_table
    return (list(table.dynamic_entries), table.maxsize, table._current_size, table.resized)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, max_size=40))
def test_the_decoder_answers_as_plain_hpack_does(steps: list[Any]) -> None:
    peer = hpack.Encoder()  # the other side's encoder, Huffman and never-indexed fields included
    plain, caching = hpack.Decoder(), CachingDecoder()
    blocks: list[bytes] = []
    for op, *args in steps:
        if op == "block" or (op == "repeat" and blocks):
            if op == "block":
                fields, huffman, sensitive = args
                block = peer.encode([(n, v, sensitive) for n, v in fields], huffman=huffman)
                blocks.append(block)
            else:
                block = blocks[args[0] % len(blocks)]
            assert outcome(caching.decode, block, True) == outcome(plain.decode, block, True)
            # and again straight away: what a client repeating a call sends
            assert outcome(caching.decode, block, True) == outcome(plain.decode, block, True)
        elif op == "table_size":
            peer.header_table_size = args[0]
        elif op == "list_limit":
            plain.max_header_list_size = caching.max_header_list_size = args[0]
        elif op == "allowed_table":
            plain.max_allowed_table_size = caching.max_allowed_table_size = args[0]
        elif op == "garbage":
            assert outcome(caching.decode, args[0], True) == outcome(plain.decode, args[0], True)
        assert table_state(caching) == table_state(plain)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, max_size=40))
def test_the_encoder_writes_what_plain_hpack_writes(steps: list[Any]) -> None:
    plain, caching = hpack.Encoder(), CachingEncoder()
    lists: list[list[tuple[bytes, bytes]]] = []
    for op, *args in steps:
        if op == "block" or (op == "repeat" and lists):
            if op == "block":
                fields = list(args[0])
                if args[2]:
                    fields[0] = hpack.NeverIndexedHeaderTuple(*fields[0])
                lists.append(fields)
            else:
                fields = lists[args[0] % len(lists)]
                if args[1]:  # the same fields, flagged never-indexed this time
                    fields = [hpack.NeverIndexedHeaderTuple(*f) for f in fields]
            expected = plain.encode(list(fields), huffman=False)
            assert caching.encode(list(fields)) == expected
            assert caching.encode(list(fields)) == plain.encode(list(fields), huffman=False)
        elif op == "table_size":
            plain.header_table_size = caching.header_table_size = args[0]
        assert table_state(caching) == table_state(plain)


def test_a_repeated_block_is_decoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    peer = hpack.Encoder()
    fields = [(b":method", b"POST"), (b":path", b"/pkg.Svc/Echo"), (b"xid", b"10.0.0.1:8091:7")]
    first = peer.encode(fields)  # inserts: the decode changes the table, nothing kept
    again = peer.encode(fields)  # all indexed now
    decoder = CachingDecoder()
    assert decoder.decode(first, raw=True) == fields
    calls = []
    real = hpack.Decoder.decode
    monkeypatch.setattr(hpack.Decoder, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(5):
        assert decoder.decode(again, raw=True) == fields
    assert len(calls) == 1


def test_a_repeated_list_is_encoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    encoder = CachingEncoder()
    encoder.encode(list(fields))  # the first inserts content-type: not kept
    calls = []
    real = hpack.Encoder.encode
    monkeypatch.setattr(hpack.Encoder, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    blocks = {encoder.encode(list(fields)) for _ in range(5)}
    assert len(blocks) == 1 and len(calls) == 1


def test_a_kept_block_over_a_lowered_limit_is_still_a_bomb() -> None:
    peer = hpack.Encoder()
    fields = [(b"x-bomb", b"b" * 200)] * 3
    first = peer.encode(fields)
    block = peer.encode(fields)  # three indexed references to one 238-byte entry
    decoder = CachingDecoder()
    decoder.decode(first, raw=True)  # fills the table as the peer's
    assert decoder.decode(block, raw=True) == fields  # kept
    decoder.max_header_list_size = 500
    with pytest.raises(hpack.OversizedHeaderListError):
        decoder.decode(block, raw=True)


def test_a_kept_block_after_the_allowed_table_shrank_is_refused() -> None:
    peer = hpack.Encoder()
    fields = [(b"x-a", b"1")]
    decoder = CachingDecoder()
    decoder.decode(peer.encode(fields), raw=True)
    block = peer.encode(fields)
    decoder.decode(block, raw=True)  # kept
    decoder.max_allowed_table_size = 100  # the peer has not shrunk its table (4096)
    with pytest.raises(hpack.InvalidTableSizeError):
        decoder.decode(block, raw=True)


def test_a_kept_block_is_forgotten_when_the_table_changes() -> None:
    peer = hpack.Encoder()
    decoder = CachingDecoder()
    decoder.decode(peer.encode([(b"x-a", b"1")]), raw=True)
    indexed = peer.encode([(b"x-a", b"1")])  # index 62: the newest entry
    assert decoder.decode(indexed, raw=True) == [(b"x-a", b"1")]  # kept
    decoder.decode(peer.encode([(b"x-b", b"2")]), raw=True)  # now 62 is x-b
    assert decoder.decode(indexed, raw=True) == [(b"x-b", b"2")]


def test_a_never_indexed_field_is_encoded_as_plain_hpack_would() -> None:
    plain, caching = hpack.Encoder(), CachingEncoder()
    fields = [(b"authorization", b"secret"), (b"x-a", b"1")]
    for _ in range(2):  # the second is kept
        assert caching.encode(list(fields)) == plain.encode(list(fields), huffman=False)
    for sensitive in ([hpack.NeverIndexedHeaderTuple(*fields[0]), fields[1]],
                      [(*fields[0], True), (b"x-a", b"2", True)]):  # fmt: skip
        assert caching.encode(list(sensitive)) == plain.encode(list(sensitive), huffman=False)
        assert table_state(caching) == table_state(plain)


def test_what_a_connection_keeps_stays_within_its_budget() -> None:
    """Blocks of indexed references standing for many fields (a few bytes for hundreds of
    fields), and many distinct ones: what is kept never exceeds the budget."""
    peer = hpack.Encoder()
    decoder = CachingDecoder()
    for i in range(40):
        decoder.decode(peer.encode([(b"x-%d" % i, b"v")]), raw=True)
    for i in range(200):
        fields = [(b"x-%d" % (i % 40), b"v")] * (1 + i % 120)
        block = peer.encode(fields)
        assert decoder.decode(block, raw=True) == fields
        assert decoder.decode(block, raw=True) == fields
        kept = decoder._kept
        assert sum(len(k) + FIELD_COST * len(v[0]) for k, v in kept.items()) <= BUDGET
    encoder = CachingEncoder()
    for i in range(200):
        fields = [(b"x-a", b"v" * (i % 300))] * (1 + i % 50)
        encoder.encode(list(fields))
        encoder.encode(list(fields))
        kept_lists = encoder._kept
        assert (
            sum(
                len(out) + sum(FIELD_COST + len(n) + len(v) for n, v in key)
                for key, out in kept_lists.items()
            )
            <= BUDGET
        )
