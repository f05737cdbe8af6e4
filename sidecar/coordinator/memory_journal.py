"""The journal's in-memory twin (`memory://`): the same semantics as SqliteJournal without
durability, for unit tests and throwaway runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from sidecar.coordinator.journal_rows import branch_record, branch_row, global_record, global_row
from sidecar.coordinator.records import BranchRecord, GlobalRecord
from sidecar.errors import DuplicateKey, JournalUnavailable

_MISSING: Final = object()


class MemoryJournal:
    """The journal's semantics without durability: for unit tests and `memory://`.

    Same rules as SqliteJournal: upserts, a branch needs its transaction, idempotency keys
    are unique, a failed write changes nothing, closed means JournalUnavailable. Data
    survives close() and open() of the same object (like a file), not the process."""

    def __init__(self) -> None:
        self.commits = 0
        self.writes = 0
        self._open = False
        self._closed = False
        self._globals: dict[str, GlobalRecord] = {}
        self._branches: dict[int, BranchRecord] = {}
        #: xid → its branch ids (a dict as an ordered set)
        self._by_xid: dict[str, dict[int, None]] = {}
        self._global_keys: dict[str, str] = {}
        self._branch_keys: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<MemoryJournal {len(self._globals)} transactions>"

    async def open(self) -> None:
        self._open, self._closed = True, False

    async def close(self) -> None:
        if self._open:
            self._open, self._closed = False, True

    def _check_open(self, what: str) -> None:
        if not self._open:
            state = "closed" if self._closed else "not open"
            raise JournalUnavailable(f"journal {what} failed: the memory journal is {state}")

    async def write(
        self,
        globals_: Sequence[GlobalRecord] = (),
        branches: Sequence[BranchRecord] = (),
    ) -> None:
        self._check_open("write")
        # validate like the database would (enum values, bytes), before changing anything
        globals_ = [global_record(global_row(g)) for g in globals_]
        branches = [branch_record(branch_row(b)) for b in branches]
        undo: list[tuple[dict[Any, Any], Any, Any]] = []
        try:
            for g in globals_:
                self._putglobal_record(g, undo)
            for b in branches:
                self._putbranch_record(b, undo)
        except JournalUnavailable:
            for table, key, old in reversed(undo):
                if old is _MISSING:
                    del table[key]
                else:
                    table[key] = old
            raise
        self.commits += 1
        self.writes += 1

    @staticmethod
    def _set(table: dict[Any, Any], key: Any, value: Any, undo: list[Any]) -> None:
        undo.append((table, key, table.get(key, _MISSING)))
        table[key] = value

    @staticmethod
    def _del(table: dict[Any, Any], key: Any, undo: list[Any]) -> None:
        undo.append((table, key, table[key]))
        del table[key]

    def _putglobal_record(self, g: GlobalRecord, undo: list[Any]) -> None:
        key = g.idempotency_key
        if key is not None and self._global_keys.get(key, g.xid) != g.xid:
            raise DuplicateKey(
                "journal write failed: UNIQUE constraint failed: globals.idempotency_key"
            )
        old = self._globals.get(g.xid)
        if old is not None and old.idempotency_key is not None:
            self._del(self._global_keys, old.idempotency_key, undo)
        if key is not None:
            self._set(self._global_keys, key, g.xid, undo)
        self._set(self._globals, g.xid, g, undo)

    def _putbranch_record(self, b: BranchRecord, undo: list[Any]) -> None:
        if b.xid not in self._globals:
            raise JournalUnavailable("journal write failed: FOREIGN KEY constraint failed")
        key = b.idempotency_key
        if key is not None and self._branch_keys.get(key, b.branch_id) != b.branch_id:
            raise DuplicateKey(
                "journal write failed: UNIQUE constraint failed: branches.idempotency_key"
            )
        old = self._branches.get(b.branch_id)
        if old is not None:
            if old.idempotency_key is not None:
                self._del(self._branch_keys, old.idempotency_key, undo)
            self._del(self._by_xid[old.xid], b.branch_id, undo)
        if key is not None:
            self._set(self._branch_keys, key, b.branch_id, undo)
        if b.xid not in self._by_xid:
            self._set(self._by_xid, b.xid, {}, undo)
        self._set(self._by_xid[b.xid], b.branch_id, None, undo)
        self._set(self._branches, b.branch_id, b, undo)

    def _branches_of(self, xid: str) -> list[BranchRecord]:
        found = [self._branches[bid] for bid in self._by_xid.get(xid, ())]
        return sorted(found, key=lambda b: (b.seq, b.branch_id))

    async def unfinished(self) -> list[tuple[GlobalRecord, list[BranchRecord]]]:
        self._check_open("read")
        live = sorted(
            (g for g in self._globals.values() if not g.status.finished),
            key=lambda g: (g.begin_ms, g.xid),
        )
        return [(g, self._branches_of(g.xid)) for g in live]

    async def find(self, xid: str) -> tuple[GlobalRecord, list[BranchRecord]] | None:
        self._check_open("read")
        g = self._globals.get(xid)
        return None if g is None else (g, self._branches_of(xid))

    async def find_global_by_key(self, idempotency_key: str) -> GlobalRecord | None:
        self._check_open("read")
        xid = self._global_keys.get(idempotency_key)
        return None if xid is None else self._globals[xid]

    async def find_branch_by_key(self, idempotency_key: str) -> BranchRecord | None:
        self._check_open("read")
        branch_id = self._branch_keys.get(idempotency_key)
        return None if branch_id is None else self._branches[branch_id]

    async def compact(self, finished_before_ms: int) -> int:
        self._check_open("write")
        gone = [
            g
            for g in self._globals.values()
            if g.status.finished and g.updated_ms < finished_before_ms
        ]
        for g in gone:
            for branch_id in self._by_xid.pop(g.xid, {}):
                branch = self._branches.pop(branch_id)
                if branch.idempotency_key is not None:
                    del self._branch_keys[branch.idempotency_key]
            if g.idempotency_key is not None:
                del self._global_keys[g.idempotency_key]
            del self._globals[g.xid]
        if gone:
            self.commits += 1
        return len(gone)
