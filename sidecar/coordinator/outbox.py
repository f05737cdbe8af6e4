"""Decisions that could not be delivered to the coordinator cluster, kept until they are.

When the app's answer decides a cluster-owned transaction (commit or rollback) and the
cluster cannot be reached, the decision is written here — fsync'd, in a SQLite file beside
the journal — before the app is answered (503, `x-gts-transaction-status: Unknown`). A
background task re-sends every pending decision with backoff until the cluster answers
anything but "unavailable"; then the row goes. A restart resumes the re-sending. Without the
outbox a commit decided during an outage would be lost, and the cluster would time the
transaction out and roll back work the app was told would stand.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sidecar.errors import CoordinatorUnavailable, JournalUnavailable, SidecarError
from sidecar.txn.sqlite_file import open_sqlite

log = logging.getLogger("sidecar.outbox")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS decisions (xid TEXT PRIMARY KEY, commit_ INTEGER NOT NULL, "
    "created_ms INTEGER NOT NULL)",
)

#: send(xid, commit) → the status the cluster answered; raises CoordinatorUnavailable
Sender = Callable[[str, bool], Awaitable[str]]


class DecisionPending(CoordinatorUnavailable):
    """The decision is journalled and will be re-sent; its outcome is not known yet."""

    def __init__(self, xid: str, commit: bool, cause: str) -> None:
        what = "commit" if commit else "rollback"
        super().__init__(
            f"the coordinator cluster is unreachable ({cause}); the {what} of {xid} is "
            "journalled and will be re-sent when it returns: the outcome is Unknown until then"
        )
        self.xid = xid


class Outbox:
    def __init__(
        self,
        path: str | None,
        send: Sender,
        *,
        initial: float = 1.0,
        maximum: float = 30.0,
    ) -> None:
        self.path = path  # None: in memory (tests, memory:// journals)
        self._send = send
        self.initial = initial
        self.maximum = maximum
        self._conn: sqlite3.Connection | None = None
        self._memory: dict[str, tuple[bool, int]] = {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        if self.path is not None:
            try:
                self._conn = await asyncio.to_thread(open_sqlite, self.path, _SCHEMA)
            except (sqlite3.Error, OSError) as exc:
                raise JournalUnavailable(f"cannot open outbox at {self.path!r}: {exc}") from None
        self._task = asyncio.get_running_loop().create_task(
            self._deliver_forever(), name="outbox-delivery"
        )
        if await self.pending():
            self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            async with self._lock:
                await asyncio.to_thread(conn.close)

    async def _db(self, what: str, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        conn = self._conn
        assert conn is not None
        async with self._lock:
            try:
                return await asyncio.to_thread(lambda: conn.execute(sql, args).fetchall())
            except sqlite3.Error as exc:
                raise JournalUnavailable(f"outbox {what} failed: {exc}") from None

    async def record(self, xid: str, commit: bool) -> None:
        """Durably keep a decision (the latest one for an XID wins)."""
        now = time.time_ns() // 1_000_000
        if self._conn is None:
            self._memory[xid] = (commit, now)
        else:
            await self._db(
                "write",
                "INSERT INTO decisions (xid, commit_, created_ms) VALUES (?, ?, ?) "
                "ON CONFLICT (xid) DO UPDATE SET commit_ = excluded.commit_",
                (xid, int(commit), now),
            )
        self._wake.set()

    async def pending(self) -> list[tuple[str, bool]]:
        if self._conn is None:
            return [(x, c) for x, (c, _) in self._memory.items()]
        rows = await self._db("read", "SELECT xid, commit_ FROM decisions ORDER BY created_ms")
        return [(str(x), bool(c)) for x, c in rows]

    async def _done(self, xid: str) -> None:
        if self._conn is None:
            self._memory.pop(xid, None)
        else:
            await self._db("delete", "DELETE FROM decisions WHERE xid = ?", (xid,))

    async def deliver_once(self) -> int:
        """Try every pending decision once; returns how many are left."""
        left = 0
        for xid, commit in await self.pending():
            try:
                status = await self._send(xid, commit)
            except CoordinatorUnavailable:
                left += 1
                continue
            except SidecarError as exc:
                # the cluster answered (e.g. it no longer knows the XID): nothing to re-send
                log.warning(
                    "journalled decision refused by the coordinator; dropped",
                    extra={"xid": xid, "commit": commit, "error": exc.message},
                )
                await self._done(xid)
                continue
            log.info(
                "journalled decision delivered",
                extra={"xid": xid, "commit": commit, "status": status},
            )
            await self._done(xid)
        return left

    async def _deliver_forever(self) -> None:
        delay = self.initial
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                left = await self.deliver_once()
            except JournalUnavailable as exc:
                log.error("outbox unreadable", extra={"error": exc.message})
                left = 1
            if left:
                await asyncio.sleep(delay)
                delay = min(self.maximum, delay * 2)
                self._wake.set()
            else:
                delay = self.initial
