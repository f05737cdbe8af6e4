"""The peer protocol's XIDs are held to xid.max_length (the limit the data plane applies),
not to a fixed 128 bytes."""

from __future__ import annotations

import orjson
import pytest

from sidecar.coordinator import protocol
from sidecar.errors import XidInvalid

LONG_XID = f"{'a' * 60}.{'b' * 60}.example:8091:1"  # 136 bytes


def register_body(xid: str) -> bytes:
    return orjson.dumps(
        {"xid": xid, "branchType": "TCC", "resourceId": "r", "callbackUrl": "http://h:1/cb",
         "applicationData": {}}
    )  # fmt: skip


def test_a_long_xid_is_refused_by_default_and_taken_under_a_raised_limit() -> None:
    with pytest.raises(XidInvalid, match="longer than the 128-byte limit"):
        protocol.parse_register(register_body(LONG_XID))
    assert protocol.parse_register(register_body(LONG_XID), 200).xid == LONG_XID
    report = orjson.dumps({"xid": LONG_XID, "branchId": 1, "status": "PhaseOne_Done"})
    with pytest.raises(XidInvalid):
        protocol.parse_report(report)
    assert protocol.parse_report(report, 200).xid == LONG_XID
    assert protocol.xid_field(LONG_XID, max_length=200) == LONG_XID
