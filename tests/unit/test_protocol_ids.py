"""64-bit ids in JSON (sidecar.coordinator.protocol.id_value / id_text): written as strings,
read from a digit string or an integer, 1..2^63-1, anything else a 400 naming the field."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.coordinator.protocol import MAX_ID, id_text, id_value, ids_as_text
from sidecar.errors import InvalidRequest

IDS = st.integers(1, MAX_ID)


@given(IDS)
def test_an_id_survives_a_decoder_that_reads_numbers_as_doubles(n: int) -> None:
    sent = json.dumps({"branchId": id_text(n)})
    assert id_value(json.loads(sent, parse_int=float)["branchId"], "branchId") == n


@given(IDS)
def test_a_string_or_an_integer_is_read(n: int) -> None:
    assert id_value(str(n), "branchId") == id_value(n, "branchId") == n


@given(st.text(max_size=25))
def test_a_string_is_read_only_when_it_is_ascii_digits_in_range(s: str) -> None:
    valid = s.isascii() and s.isdigit() and len(s) <= 19 and 0 < int(s) <= MAX_ID
    if valid:
        assert id_value(s, "branchId") == int(s)
    else:
        with pytest.raises(InvalidRequest, match="branchId"):
            id_value(s, "branchId")


@pytest.mark.parametrize(
    "bad",
    [None, True, False, 0, -1, MAX_ID + 1, 1.0, 1.5, [], {}, "", "0", " 1", "1 ", "+1", "-1",
     "1e3", "0x1f", "1_000", "\u0661", "\uff11", str(MAX_ID + 1), "9" * 20],
)  # fmt: skip
def test_anything_else_is_refused_naming_the_field(bad: object) -> None:
    with pytest.raises(InvalidRequest, match="^branchId "):
        id_value(bad, "branchId")


def test_a_relayed_status_gets_string_ids() -> None:
    relayed = {"xid": "h:1:2", "branches": [{"branchId": 2**62 + 1}, {"branchId": "7"}, "x"]}
    assert ids_as_text(relayed)["branches"] == [
        {"branchId": str(2**62 + 1)},
        {"branchId": "7"},
        "x",
    ]
    assert ids_as_text({"xid": "h:1:2"}) == {"xid": "h:1:2"}
