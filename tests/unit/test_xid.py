"""Unit and property tests for sidecar/xid.py: parse, validate, generate (README, "The XID")."""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import re
import threading
import time

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sidecar import xid
from sidecar.errors import SidecarError, XidInvalid

#: every `reason` parse may give; a metric label, so the set must stay bounded
REASONS = frozenset({"empty", "length", "control", "truncated", "format", "port", "txid", "host"})

#: C0 controls, DEL and C1 controls: none may reach an error message (and so a log) raw
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")

_SALT_MAX = 511
_TIME_SHIFT = 21  # 9 salt bits + 12 counter bits
_COUNTER_PER_MS = 4096


def _invalid(value: str | bytes, max_length: int = xid.DEFAULT_MAX_LENGTH) -> XidInvalid:
    with pytest.raises(XidInvalid) as info:
        xid.parse(value, max_length=max_length)
    err = info.value
    assert err.reason in REASONS
    assert not _CONTROL_CHARS.search(err.message), err.message
    return err


# --- strategies ----------------------------------------------------------------------------

_LABEL = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)

dns_names = (
    st.lists(_LABEL, min_size=1, max_size=4)
    .map(".".join)
    # an all-numeric name is read as an IPv4 address, not a DNS name (RFC 1123 §2.1)
    .filter(lambda name: not re.fullmatch(r"[0-9.]+", name))
)
ipv4_hosts = st.ip_addresses(v=4).map(str)
ipv6_hosts = st.ip_addresses(v=6).map(str)
valid_hosts = st.one_of(ipv4_hosts, dns_names, ipv6_hosts)
ports = st.integers(1, 65535)
salts = st.integers(0, _SALT_MAX)
#: any millisecond the 42-bit time field can hold (after the epoch's own, whose first id has
#: counter 1: a fresh generator's last millisecond is 0)
clock_values = st.integers(xid.EPOCH_MS + 1, xid.EPOCH_MS + (1 << 42) - 1)
txids = st.integers(0, 10**20 - 1)


def _owner(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@st.composite
def valid_xids(draw: st.DrawFn) -> str:
    host = draw(valid_hosts)
    return f"{_owner(host, draw(ports))}:{draw(txids)}"


# --- parse: valid values -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "host", "port", "txid"),
    [
        ("10.0.1.5:8091:2014849755", "10.0.1.5", 8091, 2014849755),
        ("0.0.0.0:1:0", "0.0.0.0", 1, 0),
        ("255.255.255.255:65535:99999999999999999999", "255.255.255.255", 65535, 10**20 - 1),
        ("localhost:17020:1", "localhost", 17020, 1),
        (
            "gts-server.prod.svc.cluster.local:8091:42",
            "gts-server.prod.svc.cluster.local",
            8091,
            42,
        ),
        ("a:1:1", "a", 1, 1),
        ("1a:1:1", "1a", 1, 1),
        ("10.0.1.example:1:1", "10.0.1.example", 1, 1),
        ("[::1]:8091:7", "::1", 8091, 7),
        ("[2001:db8::1]:8091:7", "2001:db8::1", 8091, 7),
        # the host is ipaddress's canonical text, which for v4-mapped differs across Pythons
        ("[::ffff:10.0.0.1]:80:7", str(ipaddress.IPv6Address("::ffff:10.0.0.1")), 80, 7),
        ("h:1:00000000000000000001", "h", 1, 1),
    ],
)
def test_parse_valid(raw: str, host: str, port: int, txid: int) -> None:
    x = xid.parse(raw)
    assert (x.host, x.port, x.txid, x.raw) == (host, port, txid, raw)
    assert str(x) == raw
    assert xid.parse(raw.encode()) == x


def test_parse_keeps_the_raw_value_and_normalises_only_the_ipv6_host() -> None:
    x = xid.parse("[2001:DB8:0:0::1]:8091:7")
    assert x.host == "2001:db8::1"
    # forwarded exactly as received: the app and peers see the same bytes
    assert x.raw == str(x) == "[2001:DB8:0:0::1]:8091:7"
    assert x.owner == "[2001:DB8:0:0::1]:8091"


@pytest.mark.parametrize(
    ("raw", "owner"),
    [
        ("10.0.1.5:8091:1", "10.0.1.5:8091"),
        ("gts.local:80:1", "gts.local:80"),
        ("[::1]:17020:123", "[::1]:17020"),
    ],
)
def test_owner_is_host_and_port(raw: str, owner: str) -> None:
    assert xid.parse(raw).owner == owner


def test_longest_dns_label_is_accepted() -> None:
    label = "a" * 63
    assert xid.parse(f"{label}:1:1").host == label
    _invalid(f"{'a' * 64}:1:1")


def test_max_length_is_inclusive() -> None:
    raw = "10.0.1.5:8091:1"
    assert xid.parse(raw, max_length=len(raw)).raw == raw
    err = _invalid(raw, max_length=len(raw) - 1)
    assert err.reason == "length"
    assert str(len(raw)) in err.message


def test_default_max_length_is_128() -> None:
    raw = f"{'a' * 60}.{'b' * 60}:1:1"
    assert len(raw) <= 128
    xid.parse(raw)
    err = _invalid(raw + "0" * (129 - len(raw)))
    assert err.reason == "length"


def test_xid_is_frozen() -> None:
    x = xid.parse("h:1:1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        x.txid = 2  # type: ignore[misc]


# --- parse: invalid values -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty"),
        (b"", "empty"),
        # truncation: a missing field or a trailing colon
        ("10.0.1.5", "truncated"),
        ("10.0.1.5:8091", "truncated"),
        ("10.0.1.5:8091:", "truncated"),
        ("10.0.1.5:", "truncated"),
        (":8091:1", "truncated"),
        ("10.0.1.5::1", "truncated"),
        ("::", "truncated"),
        ("[::1]:8091:", "truncated"),
        ("[::1:8091:1", "truncated"),
        # extra colons
        ("10.0.1.5:8091:1:", "format"),
        ("10.0.1.5:8091:1:2", "format"),
        ("10.0.1.5::8091:1", "format"),
        ("::1:8091:1", "format"),
        ("2001:db8::1:8091:1", "format"),
        (":::", "format"),
        # control characters, anywhere
        ("10.0.1.5:8091:1\r\n", "control"),
        ("10.0.1.5:8091:1\n", "control"),
        ("10.0.1.5:80\x0091:1", "control"),
        ("\t10.0.1.5:8091:1", "control"),
        ("10.0.1.5:8091:1\x7f", "control"),
        (b"10.0.1.5:8091:1\x1b[31m", "control"),
        # ports
        ("h:0:1", "port"),
        ("h:00:1", "port"),
        ("h:08091:1", "port"),
        ("h:65536:1", "port"),
        ("h:99999:1", "port"),
        ("h:123456:1", "port"),
        ("h:1000000000000:1", "port"),
        ("h:-1:1", "port"),
        ("h:+80:1", "port"),
        ("h:80a:1", "port"),
        ("h: 80:1", "port"),
        # txids
        ("h:1:123456789012345678901", "txid"),
        ("h:1:" + "9" * 40, "txid"),
        ("h:1:12a", "txid"),
        ("h:1:-1", "txid"),
        ("h:1:+1", "txid"),
        ("h:1:1.0", "txid"),
        ("h:1:0x1f", "txid"),
        ("h:1:1 ", "txid"),
        ("h:1:\u0661", "txid"),  # ARABIC-INDIC DIGIT ONE: a digit to str.isdigit, not to us
        ("h:1:\uff11", "txid"),  # FULLWIDTH DIGIT ONE
        ("h:1:\u20ac", "txid"),  # outside latin-1
        # hosts: all-numeric names must be IPv4 addresses
        ("1.2.3:1:1", "host"),
        ("1234:1:1", "host"),
        ("256.0.0.1:1:1", "host"),
        ("1.2.3.4.5:1:1", "host"),
        ("01.2.3.4:1:1", "host"),
        ("1..2.3:1:1", "host"),
        # hosts: DNS names
        ("-h:1:1", "host"),
        ("h-:1:1", "host"),
        ("a..b:1:1", "host"),
        (".h:1:1", "host"),
        ("h.:1:1", "host"),
        ("h_x:1:1", "host"),
        ("h x:1:1", "host"),
        (" h:1:1", "host"),
        ("héllo:1:1", "host"),
        (b"h\xff:1:1", "host"),
        ("h\u0085:1:1", "host"),  # NEL, a C1 control
        ("\u4e2d\u6587:1:1", "host"),
        # hosts: IPv6
        ("[]:1:1", "host"),
        ("[:]:1:1", "host"),
        ("[::1::2]:1:1", "host"),
        ("[12345::1]:1:1", "host"),
        ("[g::1]:1:1", "host"),
        ("[1.2.3.4]:1:1", "host"),
        ("[::1%eth0]:1:1", "host"),
        ("[::1]]:1:1", "host"),
        ("[[::1]]:1:1", "host"),
        ("[1:2:3:4:5:6:7:8:9]:1:1", "host"),
        ("[::ffff:1.2.3]:1:1", "host"),
        ("h[::1]:1:1", "host"),
    ],
)
def test_parse_refuses(raw: str | bytes, reason: str) -> None:
    err = _invalid(raw)
    assert err.reason == reason, err.message


def test_error_is_a_400_xid_invalid_with_a_json_body() -> None:
    err = _invalid("10.0.1.5:8091:")
    assert isinstance(err, SidecarError)
    assert isinstance(err, ValueError)
    assert (err.code, err.status) == ("XID_INVALID", 400)
    assert "truncated" in err.message
    body = orjson.loads(err.body())
    assert body == {"error": {"code": "XID_INVALID", "message": err.message}}


@pytest.mark.parametrize(
    "raw",
    [
        "h:1:1\r\nX-Injected: 1",
        "h:1:\x1b[2J",
        "\x00\x01\x02:1:1",
        "h:1:1\x7f",
        "h\u0085\u009b:1:1",
        b"h:1\x9b:1",
        "h:" + "\x1f" * 300 + ":1",
    ],
)
def test_messages_never_echo_control_characters(raw: str | bytes) -> None:
    _invalid(raw, max_length=1000)  # the helper checks the message


def test_messages_show_at_most_a_bounded_part_of_the_value() -> None:
    err = _invalid("h" * 1000 + ":1:", max_length=2000)
    assert len(err.message) < 300
    assert "…" in err.message


@pytest.mark.parametrize("max_length", [8, 64, 128])
def test_a_long_value_is_refused_for_length_before_it_is_scanned(max_length: int) -> None:
    err = _invalid("\x00" * (max_length + 1), max_length=max_length)
    assert err.reason == "length"


# --- properties ----------------------------------------------------------------------------


@given(host=valid_hosts, port=ports, salt=salts, now=clock_values)
def test_generated_xids_parse_back(host: str, port: int, salt: int, now: int) -> None:
    gen = xid.TxidGenerator(clock_ms=lambda: now, salt=salt)
    x = xid.generate(host, port, gen)
    expected_txid = ((now - xid.EPOCH_MS) << _TIME_SHIFT) | (salt << 12)
    assert (x.host, x.port, x.txid) == (host, port, expected_txid)
    assert x.raw == f"{_owner(host, port)}:{expected_txid}"
    assert x.owner == _owner(host, port)
    again = xid.parse(x.raw)
    assert again == x
    assert xid.parse(x.raw.encode("ascii")) == x


@given(raw=valid_xids())
def test_valid_xids_round_trip(raw: str) -> None:
    x = xid.parse(raw)
    assert x.raw == raw
    assert f"{x.owner}:{x.txid}" == raw
    assert x.owner == _owner(x.host, x.port)


# Invalid shapes, each drawn with the reasons it may give.


@st.composite
def truncated_xids(draw: st.DrawFn) -> str:
    raw = draw(valid_xids())
    # cut anywhere up to and including the last colon: the txid is lost
    return raw[: draw(st.integers(1, raw.rindex(":") + 1))]


@st.composite
def extra_colon_xids(draw: st.DrawFn) -> str:
    raw = draw(valid_xids())
    colons = [i for i, c in enumerate(raw) if c == ":" and raw.count("]", 0, i) == raw.count("[")]
    where = draw(st.sampled_from(colons + [len(raw)]))
    extra = draw(st.sampled_from([":", ":1", ":a"]))
    return raw[:where] + extra + raw[where:]


@st.composite
def control_char_xids(draw: st.DrawFn) -> str:
    raw = draw(valid_xids())
    ch = draw(st.sampled_from([chr(c) for c in [*range(0x20), 0x7F]]))
    i = draw(st.integers(0, len(raw)))
    return raw[:i] + ch + raw[i:]


@st.composite
def bad_port_xids(draw: st.DrawFn) -> str:
    host = draw(valid_hosts)
    port = draw(
        st.one_of(
            st.integers(0, 65535).map(lambda p: "0" + str(p)),
            st.integers(65536, 10**12).map(str),
            st.text(st.sampled_from("0123456789+-x. "), min_size=1, max_size=6).filter(
                lambda p: not re.fullmatch(r"[1-9][0-9]{0,4}", p) or int(p) > 65535
            ),
        )
    )
    bracketed = f"[{host}]" if ":" in host else host
    return f"{bracketed}:{port}:{draw(txids)}"


@st.composite
def bad_txid_xids(draw: st.DrawFn) -> str:
    txid = draw(
        st.one_of(
            st.integers(10**20, 10**40).map(str),
            st.text(st.sampled_from("0123456789abx.+- \u0661"), min_size=1, max_size=20).filter(
                lambda t: not re.fullmatch(r"[0-9]{1,20}", t)
            ),
        )
    )
    return f"{_owner(draw(valid_hosts), draw(ports))}:{txid}"


@st.composite
def numeric_non_ipv4_xids(draw: st.DrawFn) -> str:
    host = draw(st.from_regex(r"[0-9][0-9.]{0,20}", fullmatch=True))
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        pass
    else:
        assume(False)
    return f"{host}:{draw(ports)}:{draw(txids)}"


@st.composite
def bad_ipv6_xids(draw: st.DrawFn) -> str:
    inner = draw(st.text(st.sampled_from("0123456789abcdefABCDEFgz:.%"), min_size=0, max_size=45))
    if "%" not in inner:  # a scope id is never part of an XID, even where ipaddress takes it
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            pass
        else:
            assume(False)
    return f"[{inner}]:{draw(ports)}:{draw(txids)}"


@st.composite
def too_long_xids(draw: st.DrawFn) -> tuple[str, int]:
    raw = draw(valid_xids())
    return raw, draw(st.integers(1, len(raw) - 1))


@settings(suppress_health_check=[HealthCheck.filter_too_much])
@given(
    case=st.one_of(
        st.just(("", {"empty"})),
        truncated_xids().map(lambda r: (r, {"truncated"})),
        extra_colon_xids().map(lambda r: (r, {"format"})),
        control_char_xids().map(lambda r: (r, {"control"})),
        bad_port_xids().map(lambda r: (r, {"port"})),
        bad_txid_xids().map(lambda r: (r, {"txid"})),
        numeric_non_ipv4_xids().map(lambda r: (r, {"host"})),
        bad_ipv6_xids().map(lambda r: (r, {"host"})),
    )
)
def test_invalid_shapes_never_parse(case: tuple[str, set[str]]) -> None:
    raw, reasons = case
    err = _invalid(raw, max_length=1000)
    assert err.reason in reasons, (raw, err.reason, err.message)


@given(case=too_long_xids())
def test_too_long_never_parses(case: tuple[str, int]) -> None:
    raw, max_length = case
    assert _invalid(raw, max_length=max_length).reason == "length"


def _parse_or_refuse(value: str | bytes, max_length: int) -> None:
    try:
        x = xid.parse(value, max_length=max_length)
    except XidInvalid as err:
        assert err.reason in REASONS
        assert not _CONTROL_CHARS.search(err.message), err.message
    else:
        assert x.raw == (value if isinstance(value, str) else value.decode("ascii"))
        assert len(x.raw) <= max_length
        assert 1 <= x.port <= 65535
        assert 0 <= x.txid < 10**20


_XID_ALPHABET = "0123456789abcdefAF.:[]-_ \r\n\x00\x7f\u0085é\u20ac"


@given(value=st.text(), max_length=st.integers(0, 200))
def test_arbitrary_text_parses_or_is_refused(value: str, max_length: int) -> None:
    _parse_or_refuse(value, max_length)


@given(value=st.text(st.sampled_from(_XID_ALPHABET), max_size=60))
def test_xid_like_text_parses_or_is_refused(value: str) -> None:
    _parse_or_refuse(value, xid.DEFAULT_MAX_LENGTH)


@given(value=st.binary(max_size=200), max_length=st.integers(0, 200))
def test_arbitrary_bytes_parse_or_are_refused(value: bytes, max_length: int) -> None:
    _parse_or_refuse(value, max_length)


@given(value=st.binary(max_size=200))
def test_text_and_bytes_agree(value: bytes) -> None:
    as_text = value.decode("latin-1")
    try:
        expected: xid.Xid | str = xid.parse(value)
    except XidInvalid as err:
        expected = err.reason
    try:
        got: xid.Xid | str = xid.parse(as_text)
    except XidInvalid as err:
        got = err.reason
    assert got == expected


# --- generation ----------------------------------------------------------------------------


def test_200k_ids_from_the_wall_clock_are_unique_and_increasing() -> None:
    gen = xid.TxidGenerator()
    ids = [gen.next() for _ in range(200_000)]
    assert len(set(ids)) == len(ids)
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert all(0 <= i < 1 << 63 for i in (ids[0], ids[-1]))


def test_a_clock_that_stands_still_still_gives_unique_increasing_ids() -> None:
    now = xid.EPOCH_MS + 1_000_000
    gen = xid.TxidGenerator(clock_ms=lambda: now, salt=7)
    ids = [gen.next() for _ in range(3 * _COUNTER_PER_MS + 10)]
    assert all(a < b for a, b in itertools.pairwise(ids))
    # the counter wraps: the logical clock runs ahead one millisecond at a time
    assert ids[0] >> _TIME_SHIFT == 1_000_000
    assert ids[_COUNTER_PER_MS - 1] >> _TIME_SHIFT == 1_000_000
    assert ids[_COUNTER_PER_MS] >> _TIME_SHIFT == 1_000_001
    assert ids[-1] >> _TIME_SHIFT == 1_000_003
    assert all((i >> 12) & _SALT_MAX == 7 for i in ids)


def test_a_clock_that_steps_back_never_repeats_an_id() -> None:
    times = iter([xid.EPOCH_MS + t for t in [5000, 5001, 1000, 1000, 4999, 0, 5001, 5002, 5003]])
    gen = xid.TxidGenerator(clock_ms=lambda: next(times), salt=1)
    ids = [gen.next() for _ in range(9)]
    assert all(a < b for a, b in itertools.pairwise(ids))
    # while the clock is behind, ids stay in the last millisecond seen
    assert [i >> _TIME_SHIFT for i in ids] == [5000, 5001, 5001, 5001, 5001, 5001, 5001, 5002, 5003]


@given(
    start=st.integers(xid.EPOCH_MS, xid.EPOCH_MS + 10**12),
    steps=st.lists(st.integers(-10_000, 3), min_size=1, max_size=50),
    burst=st.integers(1, 300),
    salt=salts,
)
def test_ids_stay_unique_and_increasing_under_any_clock(
    start: int, steps: list[int], burst: int, salt: int
) -> None:
    clock = [start]
    gen = xid.TxidGenerator(clock_ms=lambda: clock[0], salt=salt)
    ids = []
    for step in steps:
        clock[0] += step
        ids.extend(gen.next() for _ in range(burst))
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert all(0 <= i < 1 << 63 for i in ids)


def test_a_clock_before_the_epoch_still_gives_unique_ids() -> None:
    gen = xid.TxidGenerator(clock_ms=lambda: 0, salt=3)
    ids = [gen.next() for _ in range(_COUNTER_PER_MS + 5)]
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert all(i >= 0 for i in ids)


@settings(max_examples=25)
@given(a=salts, b=salts, now=clock_values, n=st.integers(1, 2 * _COUNTER_PER_MS + 1))
def test_different_salts_at_the_same_millisecond_never_collide(
    a: int, b: int, now: int, n: int
) -> None:
    assume(a != b)
    gen_a = xid.TxidGenerator(clock_ms=lambda: now, salt=a)
    gen_b = xid.TxidGenerator(clock_ms=lambda: now, salt=b)
    ids_a = {gen_a.next() for _ in range(n)}
    ids_b = {gen_b.next() for _ in range(n)}
    assert len(ids_a) == len(ids_b) == n
    assert not ids_a & ids_b


@pytest.mark.parametrize("salt", [-1, 512, 513, 1 << 16])
def test_a_salt_outside_9_bits_is_refused(salt: int) -> None:
    # masked, salt 512 would silently issue salt 0's ids
    with pytest.raises(ValueError, match="salt"):
        xid.TxidGenerator(salt=salt)


def test_a_random_salt_fits_9_bits() -> None:
    now = xid.EPOCH_MS
    for _ in range(50):
        txid = xid.TxidGenerator(clock_ms=lambda: now).next()
        assert txid >> 12 <= _SALT_MAX


@pytest.mark.parametrize(
    "now",
    [xid.EPOCH_MS, xid.EPOCH_MS + (1 << 42) - 1, xid.EPOCH_MS + (1 << 42), xid.EPOCH_MS + 10**15],
)
def test_ids_fit_in_63_bits(now: int) -> None:
    gen = xid.TxidGenerator(clock_ms=lambda: now, salt=_SALT_MAX)
    for _ in range(_COUNTER_PER_MS + 1):
        txid = gen.next()
        assert 0 <= txid < 1 << 63
        # and so in a signed 64-bit column of any database, and in 20 digits
        assert len(str(txid)) <= 20


def test_the_wall_clock_id_carries_the_current_millisecond() -> None:
    before = time.time_ns() // 1_000_000 - xid.EPOCH_MS
    txid = xid.TxidGenerator().next()
    after = time.time_ns() // 1_000_000 - xid.EPOCH_MS
    assert before <= txid >> _TIME_SHIFT <= after


def test_ids_are_unique_across_threads() -> None:
    gen = xid.TxidGenerator()
    results: list[list[int]] = [[] for _ in range(4)]

    def work(out: list[int]) -> None:
        out.extend(gen.next() for _ in range(20_000))

    threads = [threading.Thread(target=work, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_ids = [i for r in results for i in r]
    assert len(set(all_ids)) == len(all_ids) == 80_000
    for r in results:
        assert all(a < b for a, b in itertools.pairwise(r))


@pytest.mark.parametrize(
    ("host", "raw_prefix"),
    [
        ("10.0.1.5", "10.0.1.5:8091:"),
        ("sidecar-0.orders.svc", "sidecar-0.orders.svc:8091:"),
        ("::1", "[::1]:8091:"),
        ("fe80::1", "[fe80::1]:8091:"),
    ],
)
def test_generate_formats_the_owner(host: str, raw_prefix: str) -> None:
    x = xid.generate(host, 8091, xid.TxidGenerator(salt=0))
    assert x.raw.startswith(raw_prefix)
    assert xid.format_owner(host, 8091) == x.owner == raw_prefix[:-1]


@pytest.mark.parametrize(
    ("host", "port", "reason"),
    [
        ("", 8091, "truncated"),
        ("bad host", 8091, "host"),
        ("1.2.3", 8091, "host"),
        ("[::1]", 8091, "host"),
        ("10.0.0.1", 0, "port"),
        ("10.0.0.1", 65536, "port"),
    ],
)
def test_generate_refuses_an_owner_that_would_not_parse(host: str, port: int, reason: str) -> None:
    with pytest.raises(XidInvalid) as info:
        xid.generate(host, port, xid.TxidGenerator(salt=0))
    assert info.value.reason == reason
