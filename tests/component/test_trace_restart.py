"""A transaction's trace context survives a restart: stored with it in the journal (a real
SQLite file, the memory journal's row round trip) and in the participant's fence file, so
phase two driven by a new engine on the same journal still belongs to the trace."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from sidecar.config import PhaseTwoRetry
from sidecar.coordinator.engine import Engine
from sidecar.coordinator.journal import MemoryJournal, SqliteJournal
from sidecar.coordinator.records import BranchRecord
from sidecar.coordinator.states import BranchType, GlobalStatus
from sidecar.tracing import current, parse, transaction_span_id
from sidecar.txn.fence import FenceState
from sidecar.txn.fence_store import FenceRow, SqliteFenceStore
from tests.component.servers import wait_until

OWNER = ("10.0.0.9", 17020)
POLICY = PhaseTwoRetry(initial="10ms", max="20ms", max_attempts=100)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Caller:
    """Records the trace context each phase-two call is made in; fails while `failing`."""

    def __init__(self, failing: bool) -> None:
        self.failing = failing
        self.seen: list[tuple[str | None, str | None, str | None]] = []

    async def phase_two(self, branch: BranchRecord, commit: bool) -> str | None:
        trace, xid = current()
        self.seen.append((trace.trace_id if trace else None, trace and trace.span_id, xid))
        await asyncio.sleep(0)
        return "app down" if self.failing else None


def _engine(journal: SqliteJournal | MemoryJournal, caller: Caller) -> Engine:
    return Engine(journal, caller, owner_host=OWNER[0], owner_port=OWNER[1], policy=POLICY)


async def test_phase_two_after_a_restart_belongs_to_the_stored_trace(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.db")
    journal = SqliteJournal(path)
    await journal.open()
    first = Caller(failing=True)
    engine = _engine(journal, first)
    await engine.start()
    record = await engine.begin("order", 30_000, traceparent=TRACEPARENT)
    await engine.register(record.xid, BranchType.TCC, "inv", "http://10.0.0.5:17020/cb", b"{}")
    await engine.commit(record.xid)
    await wait_until(lambda: len(first.seen) >= 1, 10)
    await engine.stop(0)
    await journal.close()

    journal = SqliteJournal(path)
    await journal.open()
    (found, _), *_ = await journal.unfinished()
    assert found.traceparent == TRACEPARENT  # the round trip through the file
    second = Caller(failing=False)
    engine = _engine(journal, second)
    assert await engine.start() == 1
    await wait_until(lambda: len(second.seen) >= 1, 10)
    # the app's answer is recorded after the call returns: read the state once it is final
    await wait_until(lambda: engine.active == 0, 10)
    (final, _) = await engine.get(record.xid)
    await engine.stop(0)
    await journal.close()
    # before and after the restart: the trace of the begin call, as children of the
    # transaction's own span, about its XID
    expected = ("4bf92f3577b34da6a3ce929d0e0e4736", transaction_span_id(record.xid), record.xid)
    assert first.seen[0] == expected
    assert second.seen[0] == expected
    assert final.status is GlobalStatus.COMMITTED


async def test_the_memory_journal_keeps_the_trace_as_sqlite_does() -> None:
    journal = MemoryJournal()
    await journal.open()
    engine = _engine(journal, Caller(failing=False))
    await engine.start()
    record = await engine.begin("order", 30_000, traceparent=TRACEPARENT)
    (stored, _) = await journal.find(record.xid) or (None, None)
    assert stored is not None and stored.traceparent == TRACEPARENT
    # an invalid traceparent is not kept: the transaction gets a trace of its own
    other = await engine.begin("order", 30_000, traceparent="00-zz-not-a-trace-01")
    parsed = parse(other.traceparent)
    assert parsed is not None and parsed.span_id == transaction_span_id(other.xid)
    await engine.stop(0)


async def test_a_journal_from_before_gains_the_column(tmp_path: Path) -> None:
    """A file written by an older sidecar (no traceparent column) opens and keeps working."""
    path = str(tmp_path / "old.db")
    journal = SqliteJournal(path)
    await journal.open()
    await journal.close()
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE globals DROP COLUMN traceparent")
    conn.commit()
    conn.close()
    journal = SqliteJournal(path)
    await journal.open()
    engine = _engine(journal, Caller(failing=False))
    await engine.start()
    record = await engine.begin("order", 30_000, traceparent=TRACEPARENT)
    await engine.stop(0)
    await journal.close()
    journal = SqliteJournal(path)
    await journal.open()
    found = await journal.find(record.xid)
    await journal.close()
    assert found is not None and found[0].traceparent == TRACEPARENT


async def test_the_fence_row_keeps_the_try_trace_across_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "fence.db")
    store = SqliteFenceStore(path)
    await store.open()
    row = FenceRow("10.0.0.9:17020:7", 3, "inv", FenceState.TRYING, 5, 5, 9, TRACEPARENT)
    await store.put(row)
    await store.close()
    store = SqliteFenceStore(path)
    await store.open()
    assert await store.get("10.0.0.9:17020:7", 3) == row
    await store.close()
