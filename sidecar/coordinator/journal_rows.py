"""Journal records as SQLite rows and back (pure): the one place the column order lives,
shared by the SQLite journal and its in-memory twin (which round-trips every record through
a row, so it normalises exactly as SQLite does)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sidecar.coordinator.records import BranchRecord, GlobalRecord
from sidecar.coordinator.states import BranchStatus, BranchType, GlobalStatus

GlobalRow = tuple[str, str, str, int, int, int, str | None, str | None, str | None]
BranchRow = tuple[
    int, str, int, str, str, str, bytes, str, int, int, int, str | None, str | None, str | None
]

# member (or its value) -> plain value: a dict lookup instead of an Enum call and a property
# per column (four of them on every journal write); anything else still goes through the
# Enum, which raises ValueError for a value it does not know
_GLOBAL_STATUS: dict[str, str] = {s: s.value for s in GlobalStatus}
_BRANCH_STATUS: dict[str, str] = {s: s.value for s in BranchStatus}
_BRANCH_TYPE: dict[str, str] = {t: t.value for t in BranchType}


def global_row(g: GlobalRecord) -> GlobalRow:
    return (
        g.xid,
        g.name,
        _GLOBAL_STATUS.get(g.status) or GlobalStatus(g.status).value,
        g.timeout_ms,
        g.begin_ms,
        g.updated_ms,
        g.idempotency_key,
        g.request_hash,
        g.traceparent,
    )


def branch_row(b: BranchRecord) -> BranchRow:
    return (
        b.branch_id,
        b.xid,
        b.seq,
        _BRANCH_TYPE.get(b.branch_type) or BranchType(b.branch_type).value,
        b.resource_id,
        b.callback_url,
        bytes(b.application_data),
        _BRANCH_STATUS.get(b.status) or BranchStatus(b.status).value,
        b.attempts,
        int(b.stuck),
        b.updated_ms,
        b.last_error,
        b.idempotency_key,
        b.request_hash,
    )


def global_record(row: Sequence[Any]) -> GlobalRecord:
    xid, name, status, timeout_ms, begin_ms, updated_ms, key, request_hash, traceparent = row
    return GlobalRecord(
        xid=xid,
        name=name,
        status=GlobalStatus(status),
        timeout_ms=timeout_ms,
        begin_ms=begin_ms,
        updated_ms=updated_ms,
        idempotency_key=key,
        request_hash=request_hash,
        traceparent=traceparent,
    )


def branch_record(row: Sequence[Any]) -> BranchRecord:
    (bid, xid, seq, btype, resource, url, data, status, attempts, stuck, updated, err, key, rh) = (
        row
    )
    return BranchRecord(
        branch_id=bid,
        xid=xid,
        seq=seq,
        branch_type=BranchType(btype),
        resource_id=resource,
        callback_url=url,
        application_data=bytes(data),
        status=BranchStatus(status),
        attempts=attempts,
        stuck=bool(stuck),
        updated_ms=updated,
        last_error=err,
        idempotency_key=key,
        request_hash=rh,
    )
