"""Global locks in SQLite beside the journal: all or nothing, the holder named, released,
expired by wall-clock TTL, and still held after a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sidecar.errors import InvalidRequest, LockConflict
from sidecar.txn.journal_locks import JournalLocks

A = "10.0.0.1:17020:1"
B = "10.0.0.1:17020:2"


class Clock:
    def __init__(self) -> None:
        self.ms = 1_700_000_000_000

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
async def locks(tmp_path: Path):
    store = JournalLocks(str(tmp_path / "journal.db.locks"))
    await store.open()
    yield store
    await store.close()


async def test_all_or_nothing_and_the_holder_is_named(locks: JournalLocks) -> None:
    await locks.acquire(A, ["stock:1", "stock:2"])
    await locks.acquire(A, ["stock:2", "stock:3"])  # re-acquiring your own keys is fine
    with pytest.raises(LockConflict) as info:
        await locks.acquire(B, ["stock:9", "stock:3"])
    assert info.value.holder == A and info.value.key == "stock:3"
    assert await locks.holder("stock:9") is None  # nothing of the refused request was taken
    assert await locks.release_all(A) == 3
    await locks.acquire(B, ["stock:9", "stock:3"])
    assert await locks.holder("stock:3") == B


async def test_concurrent_acquirers_never_split_a_key_set(locks: JournalLocks) -> None:
    xids = [f"10.0.0.1:17020:{i}" for i in range(1, 21)]
    results = await asyncio.gather(
        *(locks.acquire(x, ["seat:1", "seat:2", f"seat:{i + 3}"]) for i, x in enumerate(xids)),
        return_exceptions=True,
    )
    winners = [x for x, r in zip(xids, results, strict=True) if r is None]
    assert len(winners) == 1
    assert {await locks.holder("seat:1"), await locks.holder("seat:2")} == {winners[0]}


async def test_survives_a_restart_and_expires_by_ttl(tmp_path: Path) -> None:
    clock = Clock()
    path = str(tmp_path / "l.locks")
    first = JournalLocks(path, clock_ms=clock)
    await first.open()
    await first.acquire(A, ["order:7"], ttl=30)
    await first.close()
    second = JournalLocks(path, clock_ms=clock)
    await second.open()
    try:
        assert await second.holder("order:7") == A  # still held after the restart
        clock.ms += 29_999
        assert await second.holder("order:7") == A
        clock.ms += 1
        assert await second.holder("order:7") is None  # the safety net, not the normal way out
        with pytest.raises(InvalidRequest):
            await second.acquire(A, ["orders:*"])  # never a whole table
    finally:
        await second.close()
