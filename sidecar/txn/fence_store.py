"""Durable fence rows: one per branch, fsync'd before the answer that depends on them.

SQLite (WAL, synchronous=FULL, incremental auto-vacuum) in a file beside the journal; every
call runs in a worker thread, one at a time, so the event loop never blocks. Retention
removes the rows of finished branches in small batches, letting fence writes in between each
batch, and gives the freed pages back to the file system. `MemoryFenceStore` has the same
semantics without durability, for tests and `memory://`.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from sidecar.errors import JournalUnavailable
from sidecar.txn.fence import FINAL_STATES, FenceState
from sidecar.txn.sqlite_file import (
    BATCH_ROWS,
    Compaction,
    checkpoint,
    compact_in_batches,
    open_sqlite,
    write_transaction,
)

log = logging.getLogger("sidecar.fence")

_FINAL_SQL: Final = ", ".join(f"'{s.value}'" for s in sorted(FINAL_STATES))
_SCHEMA: Final = [
    """
    CREATE TABLE IF NOT EXISTS fence (
        xid TEXT NOT NULL,
        branch_id INTEGER NOT NULL,
        resource TEXT NOT NULL,
        state TEXT NOT NULL,
        updated_ms INTEGER NOT NULL,
        try_started_ms INTEGER NOT NULL DEFAULT 0,
        try_deadline_ms INTEGER NOT NULL DEFAULT 0,
        traceparent TEXT,
        PRIMARY KEY (xid, branch_id)
    )
    """,
    # retention finds old finished rows without scanning the live ones
    f"CREATE INDEX IF NOT EXISTS fence_finished ON fence (updated_ms) "
    f"WHERE state IN ({_FINAL_SQL})",
]
#: columns added after the first release: an older file gains them at open
_ADDED_COLUMNS: Final = ("try_started_ms", "try_deadline_ms")
#: which rows retention removes: finished branches (the app is never called for them again)
_RETIRED: Final = f"state IN ({_FINAL_SQL}) AND updated_ms < ?"

#: compaction transactions between two checkpoints of its own (a batch writes some 20-40
#: WAL pages: SQLite's automatic checkpoint, at 1,000 pages, then never comes due)
CHECKPOINT_EVERY: Final = 16

_COLUMNS: Final = (
    "xid, branch_id, resource, state, updated_ms, try_started_ms, try_deadline_ms, traceparent"
)
_UPSERT: Final = (
    f"INSERT INTO fence ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (xid, branch_id) DO UPDATE SET state = excluded.state, "
    "updated_ms = excluded.updated_ms, try_started_ms = excluded.try_started_ms, "
    "try_deadline_ms = excluded.try_deadline_ms, traceparent = excluded.traceparent"
)


@dataclass(frozen=True, slots=True)
class FenceRow:
    xid: str
    branch_id: int
    resource: str
    state: FenceState
    updated_ms: int
    #: wall-clock ms when the latest try was recorded, and when it stops counting as running
    #: (its start plus the app's total timeout); 0 for rows that never had one
    try_started_ms: int = 0
    try_deadline_ms: int = 0
    #: the W3C traceparent of the phase-one request: phase two at the app belongs to its
    #: trace when the callback carries none (sidecar/tracing.py)
    traceparent: str | None = None


class FenceStore(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def get(self, xid: str, branch_id: int) -> FenceRow | None: ...
    async def put(self, row: FenceRow, *, durable: bool = True) -> None:
        """Write `row`; on disk before returning unless `durable` is False (then it survives
        a crash of the process, not of the machine: for records whose loss costs only time)."""
        ...

    async def compact(self, before_ms: int) -> int:
        """Remove the rows of finished branches last changed before `before_ms` and give
        their space back; returns the rows removed. Rows of branches still waiting for
        phase two stay, however old: a late cancel must find its try."""
        ...


class MemoryFenceStore:
    def __init__(self) -> None:
        self._rows: dict[tuple[str, int], FenceRow] = {}

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def get(self, xid: str, branch_id: int) -> FenceRow | None:
        return self._rows.get((xid, branch_id))

    async def put(self, row: FenceRow, *, durable: bool = True) -> None:
        self._rows[(row.xid, row.branch_id)] = row

    async def compact(self, before_ms: int) -> int:
        old = [
            k for k, r in self._rows.items() if r.state in FINAL_STATES and r.updated_ms < before_ms
        ]
        for key in old:
            del self._rows[key]
        return len(old)


def _open_fence(path: str) -> sqlite3.Connection:
    """Open (or create) the fence file (durable, incremental auto-vacuum: see open_sqlite),
    adding the columns an older file lacks."""
    conn = open_sqlite(path, _SCHEMA[:1])
    try:
        have = {row[1] for row in conn.execute("PRAGMA table_info(fence)")}
        for column in _ADDED_COLUMNS:
            if column not in have:
                conn.execute(f"ALTER TABLE fence ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
        if "traceparent" not in have:
            conn.execute("ALTER TABLE fence ADD COLUMN traceparent TEXT")
        for statement in _SCHEMA[1:]:
            conn.execute(statement)
    except BaseException:
        conn.close()
        raise
    return conn


class SqliteFenceStore:
    def __init__(self, path: str, *, batch_rows: int = BATCH_ROWS) -> None:
        self.path = path
        self.batch_rows = batch_rows
        #: what the last compaction did (rows, delete batches, pages handed back)
        self.last_compaction = Compaction()
        self._conn: sqlite3.Connection | None = None
        #: compaction's own connection for checkpoints that need not hold the store's lock
        self._side: sqlite3.Connection | None = None
        self._runs = 0
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        try:
            self._conn = await asyncio.to_thread(_open_fence, self.path)
        except (sqlite3.Error, OSError) as exc:
            raise JournalUnavailable(f"cannot open fence store at {self.path!r}: {exc}") from None

    async def close(self) -> None:
        side, self._side = self._side, None
        if side is not None:
            await asyncio.to_thread(side.close)
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
                        f"SELECT {_COLUMNS} FROM fence WHERE xid = ? AND branch_id = ?",
                        (xid, branch_id),
                    ).fetchone()
                )
            except sqlite3.Error as exc:
                raise JournalUnavailable(f"fence read failed: {exc}") from None
        if row is None:
            return None
        return FenceRow(row[0], row[1], row[2], FenceState(row[3]), row[4], row[5], row[6], row[7])

    async def put(self, row: FenceRow, *, durable: bool = True) -> None:
        conn = self._db()
        values = (
            row.xid, row.branch_id, row.resource, row.state.value, row.updated_ms,
            row.try_started_ms, row.try_deadline_ms, row.traceparent,
        )  # fmt: skip

        def write() -> None:
            if durable:
                conn.execute(_UPSERT, values)
                return
            # no fsync for this commit (WAL, synchronous=NORMAL): the OS has it, so it
            # survives the process; the next durable commit syncs it along
            conn.execute("PRAGMA synchronous=NORMAL")
            try:
                conn.execute(_UPSERT, values)
            finally:
                conn.execute("PRAGMA synchronous=FULL")

        async with self._lock:
            try:
                await asyncio.to_thread(write)
            except sqlite3.Error as exc:
                raise JournalUnavailable(f"fence write failed: {exc}") from None

    async def _side_checkpoint(self) -> None:
        """A PASSIVE checkpoint on a connection of its own, without the store's lock: it
        copies the WAL into the file while fence writes go on, so that neither the batches
        (SQLite's automatic checkpoint runs inside the commit that crosses its threshold) nor
        the final truncation have much left to copy while a fence write waits."""
        try:
            if self._side is None:
                self._side = await asyncio.to_thread(
                    sqlite3.connect, self.path, check_same_thread=False, isolation_level=None
                )
            side = self._side
            await asyncio.to_thread(
                lambda: side.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            )
        except sqlite3.Error as exc:
            raise JournalUnavailable(f"fence checkpoint failed: {exc}") from None

    async def _run(self, fn: Callable[[sqlite3.Connection], int]) -> int:
        """One write transaction, alone on the connection, off the loop."""
        conn = self._db()
        self._runs += 1
        if self._runs % CHECKPOINT_EVERY == 0:
            await self._side_checkpoint()
        async with self._lock:
            try:
                return await asyncio.to_thread(write_transaction, conn, fn)
            except sqlite3.Error as exc:
                raise JournalUnavailable(f"fence compaction failed: {exc}") from None

    async def compact(self, before_ms: int) -> int:
        """In batches of `batch_rows`, each its own transaction; the store's lock is let go
        between batches, so a fence write waits for one batch at most, never for the lot.
        Then the freed pages go back to the file system (the file shrinks at the
        checkpoint that follows)."""
        done = await compact_in_batches(
            self._run, "fence", _RETIRED, (before_ms,), limit=self.batch_rows
        )
        self.last_compaction = done
        if done.pages:
            await self._side_checkpoint()
            conn = self._db()
            async with self._lock:
                try:
                    await asyncio.to_thread(checkpoint, conn)
                except sqlite3.Error as exc:
                    raise JournalUnavailable(f"fence checkpoint failed: {exc}") from None
        if done.rows:
            log.info(
                "fence compacted",
                extra={"rows": done.rows, "batches": done.batches, "pages_returned": done.pages},
            )
        return done.rows


def open_fence_store(path: str | None) -> FenceStore:
    """SQLite at `path` (beside the journal), or in memory when there is none."""
    return MemoryFenceStore() if path is None else SqliteFenceStore(path)


def now_ms() -> int:
    return time.time_ns() // 1_000_000
