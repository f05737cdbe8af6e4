"""Decisions that could not be delivered to the coordinator cluster, kept until they are.

When the app's answer decides a cluster-owned transaction (commit or rollback) and the
cluster cannot be reached, the decision is written here — fsync'd, in a SQLite file beside
the journal — before the app is answered (503, `x-gts-transaction-status: Unknown`). A
background task re-sends every pending decision with backoff until the cluster answers
anything but "unavailable"; then the row goes. A restart resumes the re-sending. Without the
outbox a commit decided during an outage would be lost, and the cluster would time the
transaction out and roll back work the app was told would stand.

Bounds. At most `max_items` decisions are kept (pending and stuck together): past that a new
decision is refused with 503 OUTBOX_FULL instead of growing the file without limit (the
caller is told its outcome is Unknown, and the cluster will roll the transaction back at its
timeout). `gts_sidecar_outbox_depth` shows how many are kept.

Refused decisions. When the cluster answers a re-sent decision with a refusal (it no longer
knows the XID, it decided otherwise), the decision is not dropped: it stays as a *stuck*
item, with the refusal, for an operator to see (`GET /admin/outbox`) and settle: retry it
(it becomes pending again) or skip it (it goes). Stuck items left alone go once they have
been stuck for `local_coordinator.retention` (`compact`), in small batches.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from sidecar.errors import CoordinatorUnavailable, JournalUnavailable, SidecarError
from sidecar.txn.sqlite_file import (
    Compaction,
    compact_in_batches,
    file_bytes,
    open_sqlite,
    write_transaction,
)

if TYPE_CHECKING:
    from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.outbox")

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS decisions (xid TEXT PRIMARY KEY, commit_ INTEGER NOT NULL, "
    "created_ms INTEGER NOT NULL)",
)
#: columns added after the first release; a file made before them gains them at open
_COLUMNS: Final = (
    ("state", "TEXT NOT NULL DEFAULT 'pending'"),
    ("attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("updated_ms", "INTEGER NOT NULL DEFAULT 0"),
    ("last_error", "TEXT"),
)
_INDEX: Final = "CREATE INDEX IF NOT EXISTS decisions_state ON decisions (state, updated_ms)"
_ITEM_COLS: Final = "xid, commit_, state, created_ms, updated_ms, attempts, last_error"

#: default of local_coordinator.outbox_max_items
MAX_ITEMS: Final = 10_000

State = Literal["pending", "stuck"]

#: send(xid, commit) → the status the cluster answered; raises CoordinatorUnavailable
Sender = Callable[[str, bool], Awaitable[str]]


class DecisionPending(CoordinatorUnavailable):
    """The decision's outcome is not known yet: it is journalled and will be re-sent."""

    def __init__(self, xid: str, commit: bool, cause: str) -> None:
        what = "commit" if commit else "rollback"
        super().__init__(
            f"the coordinator cluster is unreachable ({cause}); the {what} of {xid} is "
            "journalled and will be re-sent when it returns: the outcome is Unknown until then"
        )
        self.xid = xid


class OutboxFull(DecisionPending):
    """The outbox holds `max_items` decisions: this one is NOT kept. Its outcome is Unknown
    as well (the call may have reached the cluster), hence a DecisionPending; without the
    decision the cluster rolls the transaction back at its timeout."""

    code = "OUTBOX_FULL"
    status = 503

    def __init__(self, xid: str, commit: bool, cause: str, limit: int) -> None:
        what = "commit" if commit else "rollback"
        SidecarError.__init__(
            self,
            f"the coordinator cluster is unreachable ({cause}) and the outbox already keeps "
            f"{limit} undelivered decisions (local_coordinator.outbox_max_items): the {what} "
            f"of {xid} is not kept; the cluster will roll it back at its timeout unless it "
            "got the decision",
        )
        self.xid = xid


class OutboxItemNotFound(SidecarError, LookupError):
    code = "OUTBOX_ITEM_NOT_FOUND"
    status = 404


@dataclass(frozen=True, slots=True)
class OutboxItem:
    xid: str
    commit: bool
    state: State
    created_ms: int
    updated_ms: int
    attempts: int
    #: the cluster's refusal, for a stuck item
    last_error: str | None

    def render(self) -> dict[str, Any]:
        return {
            "xid": self.xid,
            "decision": "commit" if self.commit else "rollback",
            "state": self.state,
            "createdMs": self.created_ms,
            "updatedMs": self.updated_ms,
            "attempts": self.attempts,
            "lastError": self.last_error,
        }


def _item(row: tuple[Any, ...]) -> OutboxItem:
    xid, commit, state, created, updated, attempts, error = row
    return OutboxItem(
        str(xid), bool(commit), "stuck" if state == "stuck" else "pending",
        int(created), int(updated), int(attempts), error,
    )  # fmt: skip


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _migrate(conn: sqlite3.Connection) -> None:
    have = {row[1] for row in conn.execute("PRAGMA table_info(decisions)")}
    for name, decl in _COLUMNS:
        if name not in have:
            conn.execute(f"ALTER TABLE decisions ADD COLUMN {name} {decl}")
    conn.execute(_INDEX)


class Outbox:
    def __init__(
        self,
        path: str | None,
        send: Sender,
        *,
        initial: float = 1.0,
        maximum: float = 30.0,
        max_items: int = MAX_ITEMS,
        metrics: Metrics | None = None,
        clock_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        self.path = path  # None: in memory (tests, memory:// journals)
        self._send = send
        self.initial = initial
        self.maximum = maximum
        self.max_items = max_items
        self._metrics = metrics
        self._clock_ms = clock_ms
        self._conn: sqlite3.Connection | None = None
        #: the in-memory table (path None), by xid, in insertion order
        self._memory: dict[str, OutboxItem] = {}
        #: xids kept (pending or stuck), mirrored from the table: the cap is checked here
        self._kept: set[str] = set()
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: what the latest compaction did
        self.last_compaction = Compaction()

    async def open(self) -> None:
        if self.path is not None:
            path = self.path

            def connect() -> sqlite3.Connection:
                conn = open_sqlite(path, _SCHEMA)
                try:
                    _migrate(conn)
                except BaseException:
                    conn.close()
                    raise
                return conn

            try:
                self._conn = await asyncio.to_thread(connect)
            except (sqlite3.Error, OSError) as exc:
                raise JournalUnavailable(f"cannot open outbox at {self.path!r}: {exc}") from None
            rows = await self._db("read", "SELECT xid FROM decisions")
            self._kept = {str(row[0]) for row in rows}
        self._set_depth()
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

    @property
    def depth(self) -> int:
        """Decisions kept now, pending and stuck."""
        return len(self._kept)

    def _set_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.outbox_depth.set(len(self._kept))

    async def _db(self, what: str, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        conn = self._conn
        if conn is None:
            raise JournalUnavailable(f"outbox {what} failed: the outbox is not open")
        async with self._lock:
            try:
                return await asyncio.to_thread(lambda: conn.execute(sql, args).fetchall())
            except sqlite3.Error as exc:
                raise JournalUnavailable(f"outbox {what} failed: {exc}") from None

    async def record(self, xid: str, commit: bool, cause: str = "") -> None:
        """Durably keep a decision (the latest one for an XID wins; a stuck one becomes
        pending again). Raises OutboxFull, keeping nothing, when `max_items` are kept."""
        new = xid not in self._kept
        if new and len(self._kept) >= self.max_items:
            if self._metrics is not None:
                self._metrics.outbox_refused.inc()
            raise OutboxFull(xid, commit, cause or "unreachable", self.max_items)
        now = self._clock_ms()
        self._kept.add(xid)  # before the write: concurrent records count it against the cap
        if self._conn is None:
            old = self._memory.get(xid)
            created = old.created_ms if old is not None else now
            self._memory[xid] = OutboxItem(xid, commit, "pending", created, now, 0, None)
        else:
            try:
                await self._db(
                    "write",
                    "INSERT INTO decisions (xid, commit_, created_ms, state, attempts, "
                    "updated_ms) VALUES (?, ?, ?, 'pending', 0, ?) ON CONFLICT (xid) DO UPDATE "
                    "SET commit_ = excluded.commit_, state = 'pending', attempts = 0, "
                    "updated_ms = excluded.updated_ms, last_error = NULL",
                    (xid, int(commit), now, now),
                )
            except BaseException:
                if new:
                    self._kept.discard(xid)
                raise
        self._set_depth()
        self._wake.set()

    async def items(self, state: State | None = None) -> list[OutboxItem]:
        """Every kept decision (or those in `state`), oldest first."""
        if self._conn is None:
            found = list(self._memory.values())
        else:
            rows = await self._db(
                "read", f"SELECT {_ITEM_COLS} FROM decisions ORDER BY created_ms, xid"
            )
            found = [_item(tuple(row)) for row in rows]
        return [i for i in found if state is None or i.state == state]

    async def pending(self) -> list[tuple[str, bool]]:
        return [(i.xid, i.commit) for i in await self.items("pending")]

    async def _done(self, xid: str) -> None:
        if self._conn is None:
            self._memory.pop(xid, None)
        else:
            await self._db("delete", "DELETE FROM decisions WHERE xid = ?", (xid,))
        self._kept.discard(xid)
        self._set_depth()

    async def _stuck(self, xid: str, error: str) -> None:
        now = self._clock_ms()
        if self._conn is None:
            old = self._memory.get(xid)
            if old is not None:
                self._memory[xid] = OutboxItem(
                    xid, old.commit, "stuck", old.created_ms, now, old.attempts + 1, error
                )
            return
        await self._db(
            "write",
            "UPDATE decisions SET state = 'stuck', attempts = attempts + 1, updated_ms = ?, "
            "last_error = ? WHERE xid = ?",
            (now, error[:500], xid),
        )

    async def _find(self, xid: str) -> OutboxItem:
        if self._conn is None:
            found = self._memory.get(xid)
        else:
            rows = await self._db(
                "read", f"SELECT {_ITEM_COLS} FROM decisions WHERE xid = ?", (xid,)
            )
            found = _item(tuple(rows[0])) if rows else None
        if found is None:
            raise OutboxItemNotFound(f"no undelivered decision for {xid!r} in the outbox")
        return found

    # --- operators ---------------------------------------------------------------------------

    async def retry(self, xid: str) -> OutboxItem:
        """Send a kept decision again (a stuck one becomes pending, its refusal kept for the
        record until the next answer)."""
        item = await self._find(xid)
        now = self._clock_ms()
        if self._conn is None:
            self._memory[xid] = OutboxItem(
                xid, item.commit, "pending", item.created_ms, now, item.attempts, item.last_error
            )
        else:
            await self._db(
                "write",
                "UPDATE decisions SET state = 'pending', updated_ms = ? WHERE xid = ?",
                (now, xid),
            )
        log.info("outbox item retried by an operator", extra={"xid": xid})
        self._wake.set()
        return await self._find(xid)

    async def skip(self, xid: str) -> OutboxItem:
        """An operator settled the decision by hand: forget it without sending it again."""
        item = await self._find(xid)
        await self._done(xid)
        log.warning(
            "outbox item skipped by an operator",
            extra={"xid": xid, "commit": item.commit, "state": item.state},
        )
        return item

    # --- retention -----------------------------------------------------------------------------

    async def compact(self, before_ms: int) -> int:
        """Remove stuck items last changed before `before_ms` (nobody settled them within
        the retention), in batches; pending ones stay until delivered. Returns how many."""
        if self._conn is None:
            old = [
                i.xid for i in self._memory.values()
                if i.state == "stuck" and i.updated_ms < before_ms
            ]  # fmt: skip
            for xid in old:
                del self._memory[xid]
            self._kept.difference_update(old)
            gone = old
        else:
            conn = self._conn
            gone = [
                str(row[0])
                for row in await self._db(
                    "read",
                    "SELECT xid FROM decisions WHERE state = 'stuck' AND updated_ms < ?",
                    (before_ms,),
                )
            ]

            async def run(fn: Callable[[sqlite3.Connection], int]) -> int:
                async with self._lock:  # one batch at a time: record() gets in between
                    try:
                        return await asyncio.to_thread(write_transaction, conn, fn)
                    except sqlite3.Error as exc:
                        raise JournalUnavailable(f"outbox compaction failed: {exc}") from None

            self.last_compaction = await compact_in_batches(
                run, "decisions", "state = 'stuck' AND updated_ms < ?", (before_ms,)
            )
            # re-read rather than subtract: an item recorded again meanwhile stayed
            rows = await self._db("read", "SELECT xid FROM decisions")
            self._kept = {str(row[0]) for row in rows}
        if gone:
            log.warning(
                "stuck outbox items removed after the retention, unsettled",
                extra={"count": len(gone), "xids": gone[:20]},
            )
        self._set_depth()
        return len(gone)

    def size_bytes(self) -> int:
        return 0 if self.path is None else file_bytes(self.path)

    # --- delivery ------------------------------------------------------------------------------

    async def deliver_once(self) -> int:
        """Try every pending decision once; returns how many are left pending."""
        left = 0
        for xid, commit in await self.pending():
            try:
                status = await self._send(xid, commit)
            except CoordinatorUnavailable:
                left += 1
                continue
            except SidecarError as exc:
                # the cluster answered with a refusal (e.g. it no longer knows the XID): not
                # worth re-sending by itself, and not to be forgotten either
                log.error(
                    "journalled decision refused by the coordinator: kept as stuck for an "
                    "operator (GET /admin/outbox)",
                    extra={"xid": xid, "commit": commit, "error": exc.message},
                )
                await self._stuck(xid, f"{exc.code}: {exc.message}")
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
