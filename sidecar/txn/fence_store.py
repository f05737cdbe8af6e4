"""Durable fence rows: one per branch, fsync'd before the answer that depends on them.

SQLite (WAL, synchronous=FULL) in a file beside the journal; every call runs in a worker
thread, one at a time, so the event loop never blocks. `MemoryFenceStore` has the same
semantics without durability, for tests and `memory://`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass
from typing import Protocol

from sidecar.errors import JournalUnavailable
from sidecar.txn.fence import FenceState
from sidecar.txn.sqlite_file import open_sqlite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fence (
    xid TEXT NOT NULL,
    branch_id INTEGER NOT NULL,
    resource TEXT NOT NULL,
    state TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (xid, branch_id)
)
"""


@dataclass(frozen=True, slots=True)
class FenceRow:
    xid: str
    branch_id: int
    resource: str
    state: FenceState
    updated_ms: int


class FenceStore(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def get(self, xid: str, branch_id: int) -> FenceRow | None: ...
    async def put(self, row: FenceRow) -> None: ...
    async def compact(self, before_ms: int) -> int: ...


class MemoryFenceStore:
    def __init__(self) -> None:
        self._rows: dict[tuple[str, int], FenceRow] = {}

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def get(self, xid: str, branch_id: int) -> FenceRow | None:
        return self._rows.get((xid, branch_id))

    async def put(self, row: FenceRow) -> None:
        self._rows[(row.xid, row.branch_id)] = row

    async def compact(self, before_ms: int) -> int:
        old = [k for k, r in self._rows.items() if r.updated_ms < before_ms]
        for key in old:
            del self._rows[key]
        return len(old)


class SqliteFenceStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        try:
            self._conn = await asyncio.to_thread(open_sqlite, self.path, [_SCHEMA])
        except (sqlite3.Error, OSError) as exc:
            raise JournalUnavailable(f"cannot open fence store at {self.path!r}: {exc}") from None

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            async with self._lock:
                await asyncio.to_thread(conn.close)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise JournalUnavailable("fence store is not open")
        return self._conn

    async def get(self, xid: str, branch_id: int) -> FenceRow | None:
        conn = self._db()
        async with self._lock:
            try:
                row = await asyncio.to_thread(
                    lambda: conn.execute(
                        "SELECT xid, branch_id, resource, state, updated_ms FROM fence "
                        "WHERE xid = ? AND branch_id = ?",
                        (xid, branch_id),
                    ).fetchone()
                )
            except sqlite3.Error as exc:
                raise JournalUnavailable(f"fence read failed: {exc}") from None
        if row is None:
            return None
        return FenceRow(row[0], row[1], row[2], FenceState(row[3]), row[4])

    async def put(self, row: FenceRow) -> None:
        conn = self._db()
        async with self._lock:
            try:
                await asyncio.to_thread(
                    conn.execute,
                    "INSERT INTO fence (xid, branch_id, resource, state, updated_ms) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (xid, branch_id) DO UPDATE SET "
                    "state = excluded.state, updated_ms = excluded.updated_ms",
                    (row.xid, row.branch_id, row.resource, row.state.value, row.updated_ms),
                )
            except sqlite3.Error as exc:
                raise JournalUnavailable(f"fence write failed: {exc}") from None

    async def compact(self, before_ms: int) -> int:
        conn = self._db()
        async with self._lock:
            try:
                cur = await asyncio.to_thread(
                    conn.execute, "DELETE FROM fence WHERE updated_ms < ?", (before_ms,)
                )
            except sqlite3.Error as exc:
                raise JournalUnavailable(f"fence compaction failed: {exc}") from None
        return int(cur.rowcount)


def open_fence_store(path: str | None) -> FenceStore:
    """SQLite at `path` (beside the journal), or in memory when there is none."""
    return MemoryFenceStore() if path is None else SqliteFenceStore(path)


def now_ms() -> int:
    return time.time_ns() // 1_000_000
