"""Global locks in the replicas' PostgreSQL database (coordinator/pg_locks.py), on a real
PostgreSQL: two journals on one database play two replicas. A lock taken through one is
seen by the other, acquire is all or nothing (also between concurrent acquirers), the locks
go in the commit of their transaction's final state whichever replica writes it (after a
takeover too), and only transactions still in Begin may lock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sidecar.coordinator.pg_journal import PgJournal
from sidecar.coordinator.pg_locks import PgLocks
from sidecar.coordinator.records import GlobalRecord
from sidecar.coordinator.states import GlobalStatus
from sidecar.errors import (
    InvalidRequest,
    LockConflict,
    TransactionNotActive,
    TransactionNotFound,
)
from tests.pg_server import PgCluster, pg_server, pg_url  # noqa: F401

T0 = 1_700_000_000_000
A, B, C = "10.0.0.1:17020:1", "10.0.0.1:17020:2", "10.0.0.2:17020:3"


@pytest.fixture
async def two(pg_server: PgCluster, pg_url: str) -> AsyncIterator[tuple[PgJournal, PgJournal]]:  # noqa: F811
    journals = []
    for name in ("replica-a", "replica-b"):
        j = PgJournal(pg_url, password=pg_server.password, statement_timeout=2.0, pool_size=4)
        await j.open()
        await j.join(name, 60.0)
        journals.append(j)
    yield journals[0], journals[1]
    for j in journals:
        await j.close()


def begun(xid: str) -> GlobalRecord:
    return GlobalRecord(xid, "order", GlobalStatus.BEGIN, 60_000, T0, T0)


async def test_a_lock_taken_through_one_replica_is_seen_by_the_other(
    two: tuple[PgJournal, PgJournal],
) -> None:
    ja, jb = two
    await ja.write([begun(A)])
    await jb.write([begun(B)])
    la, lb = PgLocks(ja), PgLocks(jb)
    await la.acquire(A, ["orders:1", "stock:sku-42"])
    assert await lb.holder("stock:sku-42") == A
    # all or nothing: B's free key is not taken because the other one is A's
    with pytest.raises(LockConflict) as conflict:
        await lb.acquire(B, ["stock:sku-9", "stock:sku-42"])
    assert (conflict.value.key, conflict.value.holder) == ("stock:sku-42", A)
    assert await la.holder("stock:sku-9") is None
    # asking again for keys it holds changes nothing (a retry is safe)
    await lb.acquire(A, ["orders:1"])
    assert await la.holder("orders:1") == A
    # DELETE frees them early, through either replica
    assert await lb.release_all(A) == 2
    await lb.acquire(B, ["stock:sku-9", "stock:sku-42"])
    assert await la.holder("stock:sku-42") == B


@pytest.mark.parametrize("final", [GlobalStatus.COMMITTED, GlobalStatus.ROLLBACKED])
async def test_locks_go_with_the_final_state_written_by_another_replica(
    two: tuple[PgJournal, PgJournal], final: GlobalStatus
) -> None:
    ja, jb = two
    record = begun(A)
    await ja.write([record])
    await PgLocks(ja).acquire(A, ["orders:7", "stock:1"])
    # replica B takes the transaction over (as when A died or B was asked to decide it)
    assert await jb.adopt(A) is not None
    deciding = record.with_status(
        GlobalStatus.COMMITTING if final is GlobalStatus.COMMITTED else GlobalStatus.ROLLBACKING,
        T0 + 1,
    )
    await jb.write([deciding])
    assert await PgLocks(ja).holder("orders:7") == A  # held until the end
    await jb.write([deciding.with_status(final, T0 + 2)])
    assert await PgLocks(ja).holder("orders:7") is None
    assert await PgLocks(ja).holder("stock:1") is None
    # and a finished transaction takes no new ones
    with pytest.raises(TransactionNotActive):
        await PgLocks(ja).acquire(A, ["orders:8"])


async def test_only_a_transaction_in_begin_here_may_lock(
    two: tuple[PgJournal, PgJournal],
) -> None:
    ja, _ = two
    locks = PgLocks(ja)
    with pytest.raises(TransactionNotFound):
        await locks.acquire(C, ["orders:1"])
    await ja.write([begun(C).with_status(GlobalStatus.COMMITTING, T0 + 1)])
    with pytest.raises(TransactionNotActive):
        await locks.acquire(C, ["orders:1"])
    assert await locks.holder("orders:1") is None
    with pytest.raises(InvalidRequest):
        await locks.acquire(C, ["orders:*"])


async def test_concurrent_acquirers_of_overlapping_keys_one_wins(
    two: tuple[PgJournal, PgJournal],
) -> None:
    ja, jb = two
    for round_ in range(10):
        xa, xb = f"10.0.0.1:17020:{100 + round_}", f"10.0.0.1:17020:{200 + round_}"
        await ja.write([begun(xa), begun(xb)])
        keys = [f"stock:{round_}-{n}" for n in range(5)]
        results = await asyncio.gather(
            PgLocks(ja).acquire(xa, keys),
            PgLocks(jb).acquire(xb, list(reversed(keys))),
            return_exceptions=True,
        )
        conflicts = [r for r in results if isinstance(r, LockConflict)]
        assert len(conflicts) == 1 and results.count(None) == 1, results
        winner = xa if results[0] is None else xb
        assert {await PgLocks(ja).holder(k) for k in keys} == {winner}


async def test_a_timeout_lets_another_transaction_take_the_key_and_compaction_drops_it(
    two: tuple[PgJournal, PgJournal],
) -> None:
    ja, jb = two
    await ja.write([begun(A), begun(B)])
    await PgLocks(ja).acquire(A, ["orders:1"], ttl=0.05)
    await PgLocks(ja).acquire(A, ["orders:2"])  # no timeout given: keeps the XID's
    async with ja._pool.acquire() as conn:  # noqa: SLF001 - let the database clock pass it
        await conn.execute("SELECT pg_sleep(0.1)")
    assert await PgLocks(jb).holder("orders:1") is None
    await PgLocks(jb).acquire(B, ["orders:1"])
    assert await PgLocks(ja).holder("orders:1") == B
    assert await ja.compact(0) == 0  # no finished transaction; the expired orders:2 goes
    async with ja._pool.acquire() as conn:  # noqa: SLF001
        left = await conn.fetch("SELECT key, xid FROM gts_locks ORDER BY key")
    assert [(r[0], r[1]) for r in left] == [("orders:1", B)]


async def test_acquires_racing_the_final_write_never_deadlock(
    two: tuple[PgJournal, PgJournal],
) -> None:
    """An acquire of a finishing transaction's keys, at the same moment as the final write
    that releases them, either conflicts or gets them: both take key rows in key order, so
    neither waits for the other in a cycle (a deadlock would surface as a failed write)."""
    ja, jb = two
    outcomes = set()
    for round_ in range(20):
        x, z = f"10.0.0.1:17020:{300 + round_}", f"10.0.0.1:17020:{400 + round_}"
        keys = [f"stock:{round_}-{n}" for n in range(6)]
        record = begun(x)
        await ja.write([record, begun(z)])
        await PgLocks(ja).acquire(x, list(reversed(keys)))
        final = record.with_status(GlobalStatus.COMMITTED, T0 + 1)
        results = await asyncio.gather(
            ja.write([final]), PgLocks(jb).acquire(z, keys), return_exceptions=True
        )
        assert results[0] is None, results
        assert results[1] is None or isinstance(results[1], LockConflict), results
        outcomes.add(type(results[1]).__name__)
        assert await PgLocks(jb).holder(keys[0]) in (None, z)


async def test_compaction_deletes_every_expired_nonce_and_lock(
    two: tuple[PgJournal, PgJournal],
) -> None:
    """Expired nonces and locks go however many there are, not one batch per run (a busy
    cluster makes several nonces per transaction, more than compaction's batch ratio)."""
    ja, _ = two
    async with ja._pool.acquire() as conn:  # noqa: SLF001
        await conn.execute(
            "INSERT INTO gts_nonces (key_id, nonce, expires_at) SELECT 'k1', "
            "md5(n::text), now() - interval '1 second' FROM generate_series(1, 4500) n"
        )
        await conn.execute(
            "INSERT INTO gts_locks (key, xid, expires_at) SELECT 'stock:' || n, "
            "'10.0.0.1:17020:1', now() - interval '1 second' FROM generate_series(1, 1200) n"
        )
        await conn.execute(
            "INSERT INTO gts_nonces (key_id, nonce, expires_at) VALUES "
            "('k1', 'fresh', now() + interval '10 minutes')"
        )
    assert await ja.compact(0) == 0
    async with ja._pool.acquire() as conn:  # noqa: SLF001
        assert await conn.fetchval("SELECT count(*) FROM gts_nonces") == 1
        assert await conn.fetchval("SELECT count(*) FROM gts_locks") == 0
