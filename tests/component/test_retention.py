"""Retention on real SQLite files: old rows go in small batches (one transaction each),
writes get in between two batches, and the files give their space back (incremental
vacuum, an older file converted once at open)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.coordinator.journal import COMPACT_BATCH, SqliteJournal
from sidecar.coordinator.records import BranchRecord, GlobalRecord
from sidecar.coordinator.states import BranchStatus, BranchType, GlobalStatus
from sidecar.txn import sqlite_file
from sidecar.txn.journal_locks import JournalLocks
from sidecar.txn.sqlite_file import file_bytes, open_sqlite

PAD = b'{"sku": "%d", "note": "' + b"x" * 400 + b'"}'


def finished(
    n: int, updated_ms: int, status: GlobalStatus = GlobalStatus.COMMITTED
) -> GlobalRecord:
    return GlobalRecord(
        xid=f"10.0.0.1:17020:{n}",
        name="order",
        status=status,
        timeout_ms=60_000,
        begin_ms=updated_ms,
        updated_ms=updated_ms,
        idempotency_key=f"k-{n}",
    )


def branch_of(g: GlobalRecord, n: int) -> BranchRecord:
    return BranchRecord(
        branch_id=n,
        xid=g.xid,
        seq=0,
        branch_type=BranchType.TCC,
        resource_id="stock",
        callback_url="http://10.0.0.2:17020/gts/branch",
        application_data=PAD % n,
        status=BranchStatus.PHASE_TWO_COMMITTED,
        updated_ms=g.updated_ms,
    )


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[SqliteJournal]:
    j = SqliteJournal(str(tmp_path / "journal.db"))
    await j.open()
    yield j
    await j.close()


async def fill(j: SqliteJournal, count: int, *, updated_ms: int, start: int = 0) -> None:
    for first in range(start, start + count, 1000):
        gs = [finished(n, updated_ms) for n in range(first, min(first + 1000, start + count))]
        await j.write(gs, [branch_of(g, first + i) for i, g in enumerate(gs)])


def auto_vacuum(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA auto_vacuum").fetchone()[0])
    finally:
        conn.close()


async def test_compaction_deletes_in_batches_and_keeps_what_is_young_or_live(
    journal: SqliteJournal,
) -> None:
    old = 2 * COMPACT_BATCH + COMPACT_BATCH // 2
    await fill(journal, old, updated_ms=1_000)
    await fill(journal, 30, updated_ms=9_000, start=old)  # finished, but too recent
    live = GlobalRecord("10.0.0.1:17020:999999", "order", GlobalStatus.COMMITTING, 1, 1, 1)
    await journal.write([live])  # unfinished and ancient: never compacted

    assert await journal.compact(5_000) == old
    done = journal.last_compaction
    assert (done.rows, done.batches) == (old, 3)  # full, full, half: never one big DELETE
    assert await journal.find(live.xid) is not None
    assert await journal.find(finished(old, 0).xid) is not None
    assert await journal.find(finished(0, 0).xid) is None
    assert await journal.find_branch_by_key("nothing") is None
    assert await journal.compact(5_000) == 0


async def test_a_write_waits_for_one_batch_not_for_the_whole_backlog(
    journal: SqliteJournal,
) -> None:
    await fill(journal, 8 * COMPACT_BATCH, updated_ms=1_000)
    commits = journal.commits
    compaction = asyncio.ensure_future(journal.compact(5_000))
    await asyncio.sleep(0)  # one loop step: the compaction has queued its first batch
    await journal.write([finished(10**9, 10**12, GlobalStatus.BEGIN)])
    # the write went in right behind the first batch, not behind the whole backlog
    assert journal.commits - commits == 2
    assert not compaction.done(), "the write waited for the whole compaction"
    assert await compaction == 8 * COMPACT_BATCH
    assert journal.last_compaction.batches == 9


async def test_the_file_gives_its_space_back(journal: SqliteJournal, tmp_path: Path) -> None:
    assert auto_vacuum(tmp_path / "journal.db") == 2  # INCREMENTAL on a new file
    await fill(journal, 3_000, updated_ms=1_000)
    await journal.compact(0)  # nothing old: a checkpoint-free baseline
    full = file_bytes(str(tmp_path / "journal.db"))
    assert await journal.compact(5_000) == 3_000
    assert journal.last_compaction.pages > 0
    empty = file_bytes(str(tmp_path / "journal.db"))
    assert empty < full / 4, (full, empty)


async def test_an_older_file_is_converted_once_at_open(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA auto_vacuum=NONE")
    conn.execute("CREATE TABLE t (x)")  # made by an older sidecar: no incremental vacuum
    conn.commit()
    conn.close()
    assert auto_vacuum(path) == 0
    j = SqliteJournal(str(path))
    await j.open()
    assert j.converted
    await j.close()
    assert auto_vacuum(path) == 2
    again = SqliteJournal(str(path))
    await again.open()
    assert not again.converted  # once only
    await again.close()


async def test_compact_in_batches_runs_one_transaction_per_batch(tmp_path: Path) -> None:
    conn = open_sqlite(str(tmp_path / "f.db"), ["CREATE TABLE r (n INTEGER, pad BLOB)"])
    conn.executemany("INSERT INTO r VALUES (?, ?)", [(n, b"p" * 300) for n in range(1_234)])
    runs: list[str] = []

    async def run(fn: sqlite_file.Callable[[sqlite3.Connection], int]) -> int:
        runs.append(fn.__name__)
        return sqlite_file.write_transaction(conn, fn)

    done = await sqlite_file.compact_in_batches(run, "r", "n < ?", (1_000,), limit=300)
    assert (done.rows, done.batches) == (1_000, 4)  # 300, 300, 300, 100
    assert runs[:4] == ["<lambda>"] * 4 and set(runs[4:]) == {"vacuum_step"}
    assert done.pages > 0 and sqlite_file.free_pages(conn) == 0
    assert conn.execute("SELECT count(*) FROM r").fetchone()[0] == 234
    conn.close()


async def test_expired_locks_are_compacted(tmp_path: Path) -> None:
    now = [1_000_000]
    locks = JournalLocks(str(tmp_path / "j.locks"), clock_ms=lambda: now[0])
    await locks.open()
    try:
        for n in range(40):
            await locks.acquire(f"10.0.0.1:17020:{n}", [f"stock:{n}a", f"stock:{n}b"], ttl=10)
        await locks.acquire("10.0.0.1:17020:999", ["stock:kept"], ttl=3600)
        await locks.acquire("10.0.0.1:17020:998", ["stock:no-ttl"])  # held until released
        now[0] += 60_000
        assert await locks.compact(0) == 80
        assert await locks.holder("stock:kept") == "10.0.0.1:17020:999"
        assert await locks.holder("stock:no-ttl") == "10.0.0.1:17020:998"
        assert await locks.holder("stock:1a") is None
        assert locks.last_compaction.rows == 80 + 40  # locks, then their TTL rows
        assert os.path.exists(tmp_path / "j.locks")
        assert locks.size_bytes() > 0
    finally:
        await locks.close()


async def test_a_running_sidecar_compacts_its_journal_and_reports_file_sizes(
    sidecar_factory, tmp_path: Path
) -> None:
    sc = await sidecar_factory(
        {"local_coordinator": {"journal": f"sqlite:///{tmp_path}/j.db", "retention": "1s"}}
    )
    engine = sc.control.engine
    tx = await engine.begin("order", 60_000)
    await engine.commit(tx.xid)
    assert await sc.control.journal.find(tx.xid) is not None

    async def gone() -> None:  # the sweep runs every second (a quarter of 1s, at least 1s)
        while await sc.control.journal.find(tx.xid) is not None:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(gone(), 10)
    sample = sc.metrics.registry.get_sample_value
    assert sample("gts_sidecar_compacted_rows_total", {"file": "journal"}) >= 1
    assert sample("gts_sidecar_journal_bytes", {"file": "journal"}) == file_bytes(
        str(tmp_path / "j.db")
    )
    assert sample("gts_sidecar_journal_bytes", {"file": "locks"}) > 0


async def test_a_journal_from_an_older_release_is_converted_and_keeps_its_data(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.db"
    j = SqliteJournal(str(path))
    await j.open()
    await fill(j, 500, updated_ms=1_000)
    await j.close()
    # as an older release left it: no incremental vacuum, the status-only index
    conn = sqlite3.connect(path)
    conn.execute("DROP INDEX globals_status_updated")
    conn.execute("CREATE INDEX globals_status ON globals(status)")
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("PRAGMA auto_vacuum=NONE")
    conn.execute("VACUUM")
    conn.close()
    assert auto_vacuum(path) == 0

    again = SqliteJournal(str(path))
    await again.open()
    try:
        assert again.converted
        assert await again.find(finished(499, 0).xid) is not None
        indexes = await again._call(
            lambda c: {
                r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='index'")
            },
            "read",
        )
        assert "globals_status_updated" in indexes and "globals_status" not in indexes
        assert await again.compact(5_000) == 500
    finally:
        await again.close()
    assert auto_vacuum(path) == 2
