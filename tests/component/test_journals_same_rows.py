"""The SQLite journal and the PostgreSQL journal store the same thing: every field of the
journal's records, the begin call's traceparent included, comes back equal from both (a
branch's registration keeps no traceparent of its own in either: phase two carries the
transaction's trace, which the global record holds)."""

from __future__ import annotations

from pathlib import Path

from sidecar.coordinator.journal import SqliteJournal
from sidecar.coordinator.pg_journal import PgJournal
from sidecar.coordinator.records import BranchRecord, GlobalRecord
from sidecar.coordinator.states import BranchStatus, BranchType, GlobalStatus
from tests.pg_server import PgCluster, pg_server, pg_url  # noqa: F401

T0 = 1_700_000_000_000
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def records() -> tuple[list[GlobalRecord], list[BranchRecord]]:
    traced = GlobalRecord(
        "10.0.0.1:17020:1", "order", GlobalStatus.COMMITTING, 60_000, T0, T0 + 5, "key-1",
        "hash-1", TRACEPARENT,
    )  # fmt: skip
    plain = GlobalRecord("10.0.0.1:17020:2", "refund", GlobalStatus.BEGIN, 5_000, T0, T0)
    branches = [
        BranchRecord(
            2**62 + 7,
            traced.xid,
            0,
            BranchType.TCC,
            "stock",
            "http://10.0.0.9:17020/cb",
            b'{"sku":"42","n":1}',
            BranchStatus.PHASE_ONE_DONE,
            2,
            True,
            T0 + 4,
            "HTTP 503",
            "bkey-1",
            "bhash-1",
        ),  # fmt: skip
        BranchRecord(
            8,
            traced.xid,
            1,
            BranchType.SAGA,
            "pay",
            "http://10.0.0.9:17020/cb",
            b"{}",
            BranchStatus.REGISTERED,
        ),  # fmt: skip
    ]
    return [traced, plain], branches


async def test_both_journals_give_back_every_field(
    tmp_path: Path,
    pg_server: PgCluster,  # noqa: F811
    pg_url: str,  # noqa: F811
) -> None:
    globals_, branches = records()
    sqlite = SqliteJournal(str(tmp_path / "journal.db"))
    pg = PgJournal(pg_url, password=pg_server.password, statement_timeout=2.0, pool_size=2)
    await sqlite.open()
    await pg.open()
    try:
        await pg.join("replica-1", 60.0)
        for journal in (sqlite, pg):
            await journal.write(globals_, branches)
        for g in globals_:
            from_sqlite, from_pg = await sqlite.find(g.xid), await pg.find(g.xid)
            assert from_sqlite is not None and from_pg is not None
            assert from_sqlite == from_pg
            assert from_pg[0] == g
        found = await pg.find(globals_[0].xid)
        assert found is not None and found[1] == branches
        unfinished = [await j.unfinished() for j in (sqlite, pg)]
        assert [sorted(u, key=lambda item: item[0].xid) for u in unfinished] == [
            sorted(unfinished[1], key=lambda item: item[0].xid)
        ] * 2
        assert len(unfinished[0]) == 2
    finally:
        await sqlite.close()
        await pg.close()
