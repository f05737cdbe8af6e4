"""What the journal stores: one row per global transaction and one per branch.

Rules: pure value objects. The engine keeps live transactions in memory and writes every
change as an upsert of these records, durably, before it acknowledges anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sidecar.coordinator.states import BranchStatus, BranchType, GlobalStatus


@dataclass(frozen=True, slots=True)
class GlobalRecord:
    xid: str
    name: str
    status: GlobalStatus
    timeout_ms: int
    #: wall clock (ms since epoch) at begin; the deadline is begin_ms + timeout_ms
    begin_ms: int
    updated_ms: int
    idempotency_key: str | None = None
    #: sha256 of the begin request, to tell a retry from a different request under one key
    request_hash: str | None = None
    #: the W3C traceparent of the begin call: the trace every later call for the
    #: transaction belongs to (sidecar/tracing.py)
    traceparent: str | None = None

    @property
    def deadline_ms(self) -> int:
        return self.begin_ms + self.timeout_ms

    def with_status(self, status: GlobalStatus, updated_ms: int) -> GlobalRecord:
        # spelled out: dataclasses.replace costs twice as much, on every state change
        return GlobalRecord(
            self.xid, self.name, status, self.timeout_ms, self.begin_ms, updated_ms,
            self.idempotency_key, self.request_hash, self.traceparent,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class BranchRecord:
    branch_id: int
    xid: str
    #: registration order within its transaction (Saga compensates in reverse)
    seq: int
    branch_type: BranchType
    resource_id: str
    callback_url: str
    #: the applicationData JSON exactly as registered
    application_data: bytes
    status: BranchStatus
    attempts: int = 0
    #: phase two gave up after max_attempts: waiting for an operator (retry or skip)
    stuck: bool = False
    updated_ms: int = 0
    last_error: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None

    def after_attempt(
        self, status: BranchStatus, attempts: int, updated_ms: int, last_error: str | None,
        stuck: bool,
    ) -> BranchRecord:  # fmt: skip
        """The branch after a phase-two attempt (spelled out: see with_status)."""
        return BranchRecord(
            self.branch_id, self.xid, self.seq, self.branch_type, self.resource_id,
            self.callback_url, self.application_data, status, attempts, stuck, updated_ms,
            last_error, self.idempotency_key, self.request_hash,
        )  # fmt: skip


class Journal(Protocol):
    """Durable storage of records. `write` returns only once the records are on disk
    (fsync'd); concurrent writes may share one commit."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def write(
        self,
        globals_: Sequence[GlobalRecord] = (),
        branches: Sequence[BranchRecord] = (),
    ) -> None: ...

    async def unfinished(self) -> list[tuple[GlobalRecord, list[BranchRecord]]]:
        """Every transaction not in a finished status, with its branches in seq order."""
        ...

    async def find(self, xid: str) -> tuple[GlobalRecord, list[BranchRecord]] | None: ...

    async def find_global_by_key(self, idempotency_key: str) -> GlobalRecord | None: ...

    async def find_branch_by_key(self, idempotency_key: str) -> BranchRecord | None: ...

    async def compact(self, finished_before_ms: int) -> int:
        """Delete finished transactions (and their branches) last updated before the given
        time; returns how many transactions went."""
        ...
