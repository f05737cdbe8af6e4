"""Fence retention on a real SQLite file: the rows of finished branches older than the
retention go, in batches that let fence writes in between, the file shrinks on disk, and the
rows of branches still waiting for phase two stay whatever their age."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from sidecar.txn.fence import FINAL_STATES, FenceState
from sidecar.txn.fence_store import FenceRow, SqliteFenceStore
from sidecar.txn.sqlite_file import file_bytes
from tests.faults.util import wait_until

DAY_MS = 86_400_000
NOW_MS = 1_800_000_000_000  # the injected clock: retention compares with this, not the wall
XID = "10.0.0.5:17020:{}"


async def _fill(store: SqliteFenceStore, count: int, state: FenceState, updated_ms: int) -> None:
    def insert() -> None:
        conn = sqlite3.connect(store.path)
        with conn:
            conn.executemany(
                "INSERT INTO fence (xid, branch_id, resource, state, updated_ms) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    (XID.format(i), i, "inventory-deduct", state.value, updated_ms)
                    for i in range(count)
                ),
            )
        conn.close()

    await asyncio.to_thread(insert)


async def test_old_finished_rows_go_and_the_file_shrinks(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.db.fence")
    store = SqliteFenceStore(path, batch_rows=500)
    await store.open()
    try:
        old = NOW_MS - 2 * DAY_MS
        await _fill(store, 6000, FenceState.CANCELLED, old)
        # live branches, however old, and finished ones younger than the retention, stay
        for i, state in enumerate([FenceState.TRIED, FenceState.TRYING]):
            await store.put(FenceRow(f"10.0.0.9:17020:{i}", 1, "inv", state, old))
        await store.put(FenceRow("10.0.0.9:17020:7", 1, "inv", FenceState.CONFIRMED, NOW_MS))
        conn = store._db()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        before = file_bytes(path)

        removed = await store.compact(NOW_MS - DAY_MS)

        assert removed == 6000
        assert store.last_compaction.batches == 13  # 12 full batches and a short one
        assert store.last_compaction.pages > 0
        left = {
            (r[0], r[1]) for r in conn.execute("SELECT state, updated_ms FROM fence").fetchall()
        }
        assert left == {("tried", old), ("trying", old), ("confirmed", NOW_MS)}
        after = file_bytes(path)
        assert after < before / 4, (before, after)
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    finally:
        await store.close()


async def test_a_fence_write_waits_for_one_batch_not_the_whole_compaction(
    tmp_path: Path,
) -> None:
    store = SqliteFenceStore(str(tmp_path / "f.fence"), batch_rows=100)
    await store.open()
    try:
        await _fill(store, 3000, FenceState.CONFIRMED, NOW_MS - 2 * DAY_MS)
        runs = completed = 0
        written_at: list[int] = []
        original = store._run

        async def counting(fn):  # type: ignore[no-untyped-def]
            nonlocal runs, completed
            runs += 1
            if runs == 2:  # a fence write arrives while the compaction runs its 2nd batch
                write = asyncio.ensure_future(
                    store.put(FenceRow("10.0.0.9:17020:1", 1, "inv", FenceState.TRYING, NOW_MS))
                )
                write.add_done_callback(lambda _: written_at.append(completed))
                pending.append(write)
            result = await original(fn)
            completed += 1
            return result

        pending: list[asyncio.Future[None]] = []
        store._run = counting  # type: ignore[method-assign]
        assert await store.compact(NOW_MS - DAY_MS) == 3000
        await pending[0]
        # the write went in right after the batch it arrived during (batches 1 and 2 were
        # done, 3 was not), not after all 30
        assert store.last_compaction.batches == 31
        assert written_at == [2]
        row = await store.get("10.0.0.9:17020:1", 1)
        assert row is not None and row.state is FenceState.TRYING
    finally:
        await store.close()


async def test_an_older_fence_file_is_converted_at_open(tmp_path: Path) -> None:
    """A file made by an earlier version: no try columns, no auto-vacuum. Opening it adds
    both and keeps its rows."""
    path = tmp_path / "old.fence"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE fence (xid TEXT NOT NULL, branch_id INTEGER NOT NULL, resource TEXT "
        "NOT NULL, state TEXT NOT NULL, updated_ms INTEGER NOT NULL, "
        "PRIMARY KEY (xid, branch_id))"
    )
    conn.execute("INSERT INTO fence VALUES ('10.0.0.5:17020:1', 3, 'inv', 'tried', 5)")
    conn.commit()
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    conn.close()
    store = SqliteFenceStore(str(path))
    await store.open()
    try:
        row = await store.get("10.0.0.5:17020:1", 3)
        assert row == FenceRow("10.0.0.5:17020:1", 3, "inv", FenceState.TRIED, 5, 0, 0)
        assert store._db().execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        plan = store._db().execute(
            "EXPLAIN QUERY PLAN SELECT rowid FROM fence WHERE state IN ("
            + ", ".join(f"'{s.value}'" for s in sorted(FINAL_STATES))
            + ") AND updated_ms < 1 LIMIT 5"
        )
        assert "fence_finished" in " ".join(str(r) for r in plan.fetchall())
    finally:
        await store.close()


async def test_the_sidecar_sweeps_its_fence(sidecar_factory, aiohttp_server, tmp_path) -> None:
    """Wiring: a running sidecar removes a confirmed branch's fence row once the retention
    (1 s here) has passed, and keeps the row of a branch still waiting for phase two."""
    from aiohttp import ClientSession, web

    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/{tail:.*}", ok)
    server = await aiohttp_server(app)
    sc = await sidecar_factory(
        {
            "app": {"url": f"http://127.0.0.1:{server.port}"},
            "local_coordinator": {
                "journal": f"sqlite:///{tmp_path.resolve()}/journal.db",
                "retention": "1s",
            },
            "tcc": [
                {
                    "resource": "inv",
                    "try": {"method": "POST", "path": "/try"},
                    "confirm": {"method": "POST", "path": "/confirm"},
                    "cancel": {"method": "POST", "path": "/cancel"},
                }
            ],
        }
    )
    engine, fence = sc.control.engine, sc.control.fence
    done, waiting = await engine.begin("done", 60_000), await engine.begin("waiting", 60_000)
    branches = {}
    async with ClientSession() as s:
        for tx in (done, waiting):
            url = f"http://127.0.0.1:{sc.ports['inbound']}/try"
            async with s.post(url, headers={"XID": tx.xid}, data=b"{}") as r:
                assert r.status == 200
            _, (branch,) = await engine.get(tx.xid)
            branches[tx.xid] = branch.branch_id
    await engine.commit(done.xid, wait=5)

    async def state(tx) -> FenceState | None:  # type: ignore[no-untyped-def]
        row = await fence.get(tx.xid, branches[tx.xid])
        return None if row is None else row.state

    await wait_until(lambda: _is(state(done), FenceState.CONFIRMED))
    await wait_until(lambda: _is(state(done), None), timeout=15)
    assert await state(waiting) is FenceState.TRIED


async def _is(value, want) -> bool:  # type: ignore[no-untyped-def]
    return (await value) is want


async def test_a_non_durable_write_leaves_the_store_durable(tmp_path: Path) -> None:
    """The record of a try's end is written without an fsync; the writes after it are
    fsync'd again (synchronous=FULL), and the row is there after a reopen."""
    store = SqliteFenceStore(str(tmp_path / "f.fence"))
    await store.open()
    row = FenceRow("10.0.0.9:17020:3", 4, "inv", FenceState.TRIED, NOW_MS, NOW_MS, NOW_MS + 5)
    try:
        await store.put(row, durable=False)
        assert store._db().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        await store.close()
    await store.open()
    try:
        assert await store.get(row.xid, row.branch_id) == row
    finally:
        await store.close()
