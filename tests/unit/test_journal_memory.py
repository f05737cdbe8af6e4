"""The Journal protocol's semantics, held by MemoryJournal and SqliteJournal alike (the
SQLite one on a file in tmp_path): upserts, unfinished, seq order, keys, compaction."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.coordinator.journal import MemoryJournal, SqliteJournal, open_journal
from sidecar.coordinator.records import BranchRecord, GlobalRecord, Journal
from sidecar.coordinator.states import BranchStatus, BranchType, GlobalStatus
from sidecar.errors import JournalUnavailable

FINISHED = [s for s in GlobalStatus if s.finished]
UNFINISHED = [s for s in GlobalStatus if not s.finished]


def gtx(n: int, status: GlobalStatus = GlobalStatus.BEGIN, **kw: object) -> GlobalRecord:
    fields: dict[str, object] = {
        "xid": f"10.0.0.1:17020:{n}",
        "name": f"order-{n}",
        "status": status,
        "timeout_ms": 60_000,
        "begin_ms": 1_000 + n,
        "updated_ms": 1_000 + n,
    }
    fields.update(kw)
    return GlobalRecord(**fields)  # type: ignore[arg-type]


def branch(g: GlobalRecord, branch_id: int, seq: int, **kw: object) -> BranchRecord:
    fields: dict[str, object] = {
        "branch_id": branch_id,
        "xid": g.xid,
        "seq": seq,
        "branch_type": BranchType.TCC,
        "resource_id": f"res-{branch_id}",
        "callback_url": "http://10.0.0.2:17020/gts/branch",
        "application_data": b'{"n":%d}' % branch_id,
        "status": BranchStatus.REGISTERED,
        "updated_ms": g.updated_ms,
    }
    fields.update(kw)
    return BranchRecord(**fields)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "sqlite"])
async def journal(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Journal]:
    j: Journal = (
        MemoryJournal() if request.param == "memory" else SqliteJournal(str(tmp_path / "j.db"))
    )
    await j.open()
    yield j
    await j.close()


async def test_records_round_trip_exactly(journal: Journal) -> None:
    g = gtx(1, GlobalStatus.COMMIT_RETRYING, idempotency_key="k1", request_hash="ab" * 32)
    b1 = branch(
        g,
        11,
        0,
        branch_type=BranchType.SAGA,
        application_data=bytes(range(256)) + b"\x00",  # not UTF-8, with NUL: raw bytes
        status=BranchStatus.PHASE_TWO_COMMIT_RETRYABLE,
        attempts=7,
        stuck=True,
        last_error="HTTP 503",
        idempotency_key="bk1",
        request_hash="cd" * 32,
    )
    b2 = branch(g, 12, 1, application_data=b"")
    await journal.write([g], [b1, b2])
    found = await journal.find(g.xid)
    assert found == (g, [b1, b2])
    got_g, (got_b1, got_b2) = found
    assert type(got_g.status) is GlobalStatus and type(got_b1.branch_type) is BranchType
    assert type(got_b1.status) is BranchStatus and got_b1.stuck is True
    assert type(got_b1.application_data) is bytes and got_b2.application_data == b""
    assert await journal.find("10.0.0.1:17020:999") is None


async def test_upsert_replaces_and_keeps_the_branches(journal: Journal) -> None:
    g = gtx(1)
    b = branch(g, 1, 0)
    await journal.write([g], [b])
    g2 = replace(g, status=GlobalStatus.COMMITTING, updated_ms=5_000)
    b2 = replace(b, status=BranchStatus.PHASE_ONE_DONE, attempts=1)
    await journal.write([g2])  # a global alone: its branches stay (no delete-and-insert)
    assert await journal.find(g.xid) == (g2, [b])
    await journal.write(branches=[b2])
    assert await journal.find(g.xid) == (g2, [b2])


async def test_one_write_may_hold_a_transaction_and_its_branches(journal: Journal) -> None:
    g = gtx(1)
    await journal.write([g], [branch(g, 1, 0), branch(g, 2, 1)])
    await journal.write([gtx(2), gtx(3)])
    assert [r.xid for r, _ in await journal.unfinished()] == [gtx(n).xid for n in (1, 2, 3)]


async def test_unfinished_excludes_finished_and_lists_branches_in_seq_order(
    journal: Journal,
) -> None:
    records = [gtx(n, status) for n, status in enumerate(GlobalStatus)]
    await journal.write(records)
    live = records[0]
    # registered out of order (and ids not in seq order): read back in seq order
    branches = [branch(live, 30, 2), branch(live, 10, 0), branch(live, 20, 3), branch(live, 5, 1)]
    await journal.write(branches=branches)
    await journal.write(branches=[branch(records[-1], 99, 0)])  # of a finished one
    got = await journal.unfinished()
    assert [r.status for r, _ in got] == UNFINISHED  # oldest begin first
    assert [b.branch_id for b in got[0][1]] == [10, 5, 30, 20]
    assert all(bs == [] for _, bs in got[1:])
    found = await journal.find(live.xid)
    assert found is not None and [b.seq for b in found[1]] == [0, 1, 2, 3]


async def test_find_by_keys_follows_upserts(journal: Journal) -> None:
    g = gtx(1, idempotency_key="begin-1")
    b = branch(g, 1, 0, idempotency_key="reg-1")
    await journal.write([g], [b])
    assert await journal.find_global_by_key("begin-1") == g
    assert await journal.find_branch_by_key("reg-1") == b
    assert await journal.find_global_by_key("reg-1") is None
    assert await journal.find_branch_by_key("begin-1") is None
    # a key changed by an upsert: the old one finds nothing any more
    await journal.write([replace(g, idempotency_key="begin-2")], [replace(b, idempotency_key=None)])
    assert await journal.find_global_by_key("begin-1") is None
    assert await journal.find_global_by_key("begin-2") == replace(g, idempotency_key="begin-2")
    assert await journal.find_branch_by_key("reg-1") is None


async def test_idempotency_keys_are_unique_and_a_failed_write_changes_nothing(
    journal: Journal,
) -> None:
    g1 = gtx(1, idempotency_key="k")
    b1 = branch(g1, 1, 0, idempotency_key="bk")
    await journal.write([g1], [b1])
    g3 = gtx(3)
    # a good record and a key taken by another transaction, in one write: neither lands
    with pytest.raises(JournalUnavailable, match="journal write failed: .*UNIQUE"):
        await journal.write([g3, gtx(2, idempotency_key="k")])
    with pytest.raises(JournalUnavailable, match="UNIQUE"):
        await journal.write([g3], [branch(g1, 2, 1, idempotency_key="bk")])
    assert await journal.find(g3.xid) is None
    assert await journal.find(gtx(2).xid) is None
    assert await journal.find(g1.xid) == (g1, [b1])
    assert await journal.find_global_by_key("k") == g1
    assert await journal.find_branch_by_key("bk") == b1
    # the same record written again under its own key is an upsert, not a conflict
    await journal.write([g1], [b1])
    assert await journal.find(g1.xid) == (g1, [b1])


async def test_a_branch_needs_its_transaction(journal: Journal) -> None:
    orphan = branch(gtx(7), 1, 0)
    with pytest.raises(JournalUnavailable, match="FOREIGN KEY"):
        await journal.write(branches=[orphan])
    assert await journal.find(orphan.xid) is None
    assert await journal.unfinished() == []


async def test_compact_removes_only_finished_and_old_with_their_branches(
    journal: Journal,
) -> None:
    old_done = [gtx(n, s, updated_ms=100, idempotency_key=f"k{n}") for n, s in enumerate(FINISHED)]
    new_done = gtx(10, GlobalStatus.COMMITTED, updated_ms=200)
    old_live = [gtx(20 + n, s, updated_ms=100) for n, s in enumerate(UNFINISHED)]
    await journal.write([*old_done, new_done, *old_live])
    for n, g in enumerate([*old_done, new_done, *old_live]):
        await journal.write(branches=[branch(g, 100 + n, 0, idempotency_key=f"b{n}")])

    assert await journal.compact(100) == 0  # strictly before
    assert await journal.compact(200) == len(old_done)
    for g in old_done:
        assert await journal.find(g.xid) is None
        assert await journal.find_global_by_key(g.idempotency_key or "") is None
    assert await journal.find_branch_by_key("b0") is None
    kept = await journal.find(new_done.xid)
    assert kept is not None and len(kept[1]) == 1
    assert [r for r, _ in await journal.unfinished()] == old_live
    assert all(len(bs) == 1 for _, bs in await journal.unfinished())
    assert await journal.compact(200) == 0
    # the keys of compacted records are free again
    again = gtx(50, idempotency_key="k0")
    await journal.write([again], [branch(again, 500, 0, idempotency_key="b0")])
    assert await journal.find_global_by_key("k0") == again


async def test_results_are_copies(journal: Journal) -> None:
    g = gtx(1)
    await journal.write([g], [branch(g, 1, 0)])
    found = await journal.find(g.xid)
    assert found is not None
    found[1].clear()
    (await journal.unfinished())[0][1].append(branch(g, 2, 1))
    again = await journal.find(g.xid)
    assert again is not None and [b.branch_id for b in again[1]] == [1]


async def test_closed_journal_refuses_everything(journal: Journal) -> None:
    g = gtx(1)
    await journal.write([g])
    await journal.close()
    with pytest.raises(JournalUnavailable, match="closed"):
        await journal.write([gtx(2)])
    with pytest.raises(JournalUnavailable, match="closed"):
        await journal.find(g.xid)
    with pytest.raises(JournalUnavailable, match="closed"):
        await journal.compact(10**15)
    await journal.close()  # twice: harmless
    await journal.open()  # the same object opens again, with its data
    assert await journal.find(g.xid) == (g, [])


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_not_open_refuses(kind: str, tmp_path: Path) -> None:
    j = MemoryJournal() if kind == "memory" else SqliteJournal(str(tmp_path / "j.db"))
    with pytest.raises(JournalUnavailable, match="not open"):
        await j.write([gtx(1)])
    with pytest.raises(JournalUnavailable, match="not open"):
        await j.unfinished()


def test_open_journal_urls() -> None:
    assert isinstance(open_journal("memory://"), MemoryJournal)
    rel = open_journal("sqlite:///var/journal.db")
    assert isinstance(rel, SqliteJournal) and rel.path == "var/journal.db"
    absolute = open_journal("sqlite:////data/gts/journal.db")
    assert isinstance(absolute, SqliteJournal) and absolute.path == "/data/gts/journal.db"
    for bad in (
        "sqlite://",
        "sqlite:///",
        "sqlite://host/x.db",
        "sqlite:///:memory:",
        "sqlite:///dir/",
        "memory://x",
        "postgres://db/x",
        "journal.db",
        "",
    ):
        with pytest.raises(ValueError, match="invalid journal"):
            open_journal(bad)


# --- both implementations answer every sequence of operations alike ------------------------

XIDS = [gtx(n).xid for n in range(4)]
KEYS = [None, "k1", "k2"]

op_global = st.builds(
    lambda n, status, updated, key: (
        "global",
        gtx(n, status, updated_ms=updated, idempotency_key=key),
    ),
    st.integers(0, 3),
    st.sampled_from(list(GlobalStatus)),
    st.integers(0, 5),
    st.sampled_from(KEYS),
)
op_branch = st.builds(
    lambda n, bid, seq, status, key, data: (
        "branch",
        branch(gtx(n), bid, seq, status=status, idempotency_key=key, application_data=data),
    ),
    st.integers(0, 3),
    st.integers(1, 5),
    st.integers(0, 3),
    st.sampled_from(list(BranchStatus)),
    st.sampled_from(KEYS),
    st.binary(max_size=8),
)
op_compact = st.tuples(st.just("compact"), st.integers(0, 6))
ops = st.lists(
    st.one_of(
        st.lists(st.one_of(op_global, op_branch), min_size=1, max_size=3).map(
            lambda batch: ("write", batch)
        ),
        op_compact,
    ),
    max_size=12,
)


async def _observe(j: Journal, program: list[tuple[str, object]]) -> list[object]:
    seen: list[object] = []
    for kind, arg in program:
        if kind == "compact":
            assert isinstance(arg, int)
            seen.append(await j.compact(arg))
        else:
            assert isinstance(arg, list)
            gs = [r for k, r in arg if k == "global"]
            bs = [r for k, r in arg if k == "branch"]
            try:
                await j.write(gs, bs)
                seen.append("ok")
            except JournalUnavailable as exc:
                seen.append(exc.message.split(":")[0])
        seen.append(await j.unfinished())
        seen.append([await j.find(x) for x in XIDS])
        seen.append([await j.find_global_by_key(k) for k in ("k1", "k2")])
        seen.append([await j.find_branch_by_key(k) for k in ("k1", "k2")])
    return seen


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=ops)
def test_memory_and_sqlite_agree(program: list[tuple[str, object]]) -> None:
    async def run() -> tuple[list[object], list[object]]:
        with tempfile.TemporaryDirectory() as tmp:
            mem, lite = MemoryJournal(), SqliteJournal(f"{tmp}/j.db")
            await mem.open()
            await lite.open()
            try:
                return await _observe(mem, program), await _observe(lite, program)
            finally:
                await lite.close()

    mem_seen, lite_seen = asyncio.run(run())
    assert mem_seen == lite_seen
