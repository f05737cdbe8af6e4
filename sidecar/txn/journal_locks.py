"""Global locks kept in SQLite beside the journal (`<journal>.locks`): the single-replica
backend that survives a restart. Same rules as txn/locks.py (read them there).

Each operation is one `BEGIN IMMEDIATE` transaction in a worker thread, one at a time, with
`synchronous=FULL`: an acquire that returned is on disk, and all-or-nothing by construction.
TTL deadlines are wall-clock milliseconds, so they keep counting across a restart.

Retention: a finished transaction's locks go when it releases them; what a crash or a lost
release leaves behind expires with its TTL (every lock has one: the control plane's default
is the longest transaction allowed). `compact` removes expired locks in small batches, each
its own transaction, so a concurrent acquire waits at most one batch, and gives the space
back (incremental vacuum).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from sidecar.errors import InvalidRequest, JournalUnavailable, LockConflict
from sidecar.txn.locks import check_key, check_keys
from sidecar.txn.sqlite_file import (
    Compaction,
    compact_in_batches,
    file_bytes,
    open_sqlite,
    write_transaction,
)
from sidecar.xid import parse as parse_xid

T = TypeVar("T")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS locks (key TEXT PRIMARY KEY, xid TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS locks_xid ON locks (xid)",
    "CREATE TABLE IF NOT EXISTS lock_ttl (xid TEXT PRIMARY KEY, deadline_ms INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS lock_ttl_deadline ON lock_ttl (deadline_ms)",
)
#: lock rows whose transaction's TTL has passed (their lock_ttl row goes after them: a crash
#: in between must never leave a lock without its TTL, held for ever)
_EXPIRED = "xid IN (SELECT xid FROM lock_ttl WHERE deadline_ms <= ?)"


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class JournalLocks:
    def __init__(
        self,
        path: str,
        *,
        default_ttl: float | None = None,
        clock_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        self.path = path
        self.default_ttl = default_ttl
        self._clock_ms = clock_ms
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()
        #: XIDs that hold (or may hold) locks: most transactions never take one, and their
        #: release must not cost a write and an fsync
        self._holders: set[str] = set()
        #: what the latest compaction did
        self.last_compaction = Compaction()

    async def open(self) -> None:
        try:
            self._conn = await asyncio.to_thread(open_sqlite, self.path, _SCHEMA)
            rows = await asyncio.to_thread(
                lambda: self._conn.execute("SELECT DISTINCT xid FROM locks").fetchall()  # type: ignore[union-attr]
            )
            self._holders = {str(row[0]) for row in rows}
        except (sqlite3.Error, OSError) as exc:
            raise JournalUnavailable(f"cannot open lock store at {self.path!r}: {exc}") from None

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            async with self._lock:
                await asyncio.to_thread(conn.close)

    async def _run(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise JournalUnavailable("lock store is not open")

        def transaction() -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        async with self._lock:
            try:
                return await asyncio.to_thread(transaction)
            except sqlite3.Error as exc:
                raise JournalUnavailable(f"lock store {what} failed: {exc}") from None

    async def compact(self, before_ms: int) -> int:
        """Remove expired locks (TTL passed by `before_ms`'s clock: the caller's retention
        does not apply, a lock is dead once its TTL is) in batches; returns the lock rows
        removed. Locks without a TTL are held until released, as acquire promised."""
        conn = self._conn
        if conn is None:
            raise JournalUnavailable("lock store is not open")
        now = self._clock_ms()

        async def run(fn: Callable[[sqlite3.Connection], int]) -> int:
            async with self._lock:  # one batch at a time: acquires get in between
                try:
                    return await asyncio.to_thread(write_transaction, conn, fn)
                except sqlite3.Error as exc:
                    raise JournalUnavailable(f"lock store compaction failed: {exc}") from None

        locks = await compact_in_batches(run, "locks", _EXPIRED, (now,))
        ttls = await compact_in_batches(run, "lock_ttl", "deadline_ms <= ?", (now,))
        self.last_compaction = locks + ttls
        return locks.rows

    def size_bytes(self) -> int:
        return file_bytes(self.path)

    def _expire(self, conn: sqlite3.Connection, now_ms: int) -> None:
        expired = [
            row[0]
            for row in conn.execute("SELECT xid FROM lock_ttl WHERE deadline_ms <= ?", (now_ms,))
        ]
        for xid in expired:
            conn.execute("DELETE FROM locks WHERE xid = ?", (xid,))
            conn.execute("DELETE FROM lock_ttl WHERE xid = ?", (xid,))

    async def acquire(self, xid: str, keys: Sequence[str], *, ttl: float | None = None) -> None:
        xid = parse_xid(xid, max_length=4096).raw
        wanted = check_keys(keys)
        if ttl is not None and not ttl > 0:
            raise InvalidRequest(f"a lock TTL must be positive, not {ttl!r}")
        ttl = ttl or self.default_ttl
        now = self._clock_ms()

        def acquire(conn: sqlite3.Connection) -> tuple[str, str] | None:
            self._expire(conn, now)
            for key in wanted:
                row = conn.execute("SELECT xid FROM locks WHERE key = ?", (key,)).fetchone()
                if row is not None and row[0] != xid:
                    return key, row[0]
            conn.executemany(
                "INSERT INTO locks (key, xid) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                [(key, xid) for key in wanted],
            )
            if ttl is not None:
                conn.execute(
                    "INSERT INTO lock_ttl (xid, deadline_ms) VALUES (?, ?) "
                    "ON CONFLICT (xid) DO UPDATE SET deadline_ms = excluded.deadline_ms",
                    (xid, now + int(ttl * 1000)),
                )
            return None

        self._holders.add(xid)  # before the write: a crash after it is covered at open
        conflict = await self._run("acquire", acquire)
        if conflict is not None:
            raise LockConflict(*conflict)

    def may_hold(self, xid: str) -> bool:
        return xid in self._holders

    async def release_all(self, xid: str) -> int:
        xid = parse_xid(xid, max_length=4096).raw
        if xid not in self._holders:
            return 0
        now = self._clock_ms()

        def release(conn: sqlite3.Connection) -> int:
            self._expire(conn, now)
            cur = conn.execute("DELETE FROM locks WHERE xid = ?", (xid,))
            conn.execute("DELETE FROM lock_ttl WHERE xid = ?", (xid,))
            return int(cur.rowcount)

        released = await self._run("release", release)
        self._holders.discard(xid)
        return released

    async def holder(self, key: str) -> str | None:
        key = check_key(key)
        now = self._clock_ms()

        def holder(conn: sqlite3.Connection) -> str | None:
            self._expire(conn, now)
            row = conn.execute("SELECT xid FROM locks WHERE key = ?", (key,)).fetchone()
            return None if row is None else str(row[0])

        return await self._run("read", holder)
