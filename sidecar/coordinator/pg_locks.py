"""Global locks in the replicas' shared PostgreSQL database (the `txn.locks.LockManager`
protocol), served by `gts-sidecar coordinator` on its peer listener: a lock taken through
one replica is seen by every other. Same rules as txn/locks.py (read them there), plus:

- The holder must be a transaction of this coordinator cluster that is still in Begin: a
  lock for an XID it does not know is refused with TRANSACTION_NOT_FOUND, one for a
  transaction already deciding or finished with TRANSACTION_NOT_ACTIVE (a lock taken after
  its release would be held for ever).
- Locks are released in the same database commit as their transaction's final state
  (pg_schema.py, migration 4: gts_write deletes them), by whichever replica writes it: the
  one that took the transaction over after its driver died too. No release call can be
  lost, and none is made per transaction.
- A `timeout` is kept as the locks' expiry (the database's clock): a key held past it may be
  taken by another transaction, and compaction deletes it. Without one, a lock lasts until
  its transaction ends.

Each acquire is one statement (the gts_lock function: the transaction's row locked, the
keys inserted in sorted order, all or nothing), committed durably before it is
acknowledged. Every statement that changes lock rows takes them in key order, so two never
wait for each other in a cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from sidecar.coordinator.pg_journal import PgJournal
from sidecar.errors import (
    InvalidRequest,
    LockConflict,
    TransactionNotActive,
    TransactionNotFound,
)
from sidecar.txn.locks import check_key, check_keys
from sidecar.xid import parse as parse_xid

#: the SQLSTATE gts_lock raises on a conflict (holder in DETAIL, key in HINT)
CONFLICT_STATE: Final = "GT001"
_XID_MAX: Final = 4096


class PgLocks:
    """Global locks in the journal's database; see the module docstring."""

    #: no cap of its own on a requested timeout (the API checks it is a positive duration)
    default_ttl: float | None = None

    def __init__(self, journal: PgJournal) -> None:
        self._journal = journal

    async def acquire(self, xid: str, keys: Sequence[str], *, ttl: float | None = None) -> None:
        xid = parse_xid(xid, max_length=_XID_MAX).raw
        wanted = check_keys(list(keys))
        if ttl is not None and not ttl > 0:
            raise InvalidRequest(f"a lock TTL must be positive, not {ttl!r}")
        import asyncpg

        async def lock(conn: Any) -> Any:
            try:
                return await conn.fetchrow("SELECT * FROM gts_lock($1, $2, $3)", xid, wanted, ttl)
            except asyncpg.PostgresError as exc:
                if getattr(exc, "sqlstate", None) == CONFLICT_STATE:
                    holder = getattr(exc, "detail", None) or "?"
                    raise LockConflict(getattr(exc, "hint", None) or wanted[0], holder) from None
                raise

        row = await self._journal.run("lock acquire failed", lock)
        reason, detail = row[0], row[1]
        if reason == "not_found":
            raise TransactionNotFound(f"no transaction {xid!r} at this coordinator")
        if reason == "not_active":
            raise TransactionNotActive(f"transaction {xid!r} is {detail}: no new locks")

    async def release_all(self, xid: str) -> int:
        xid = parse_xid(xid, max_length=_XID_MAX).raw

        async def delete(conn: Any) -> int:
            # key rows locked in key order, as acquires and final writes take them
            status = await conn.execute(
                "DELETE FROM gts_locks WHERE key IN (SELECT key FROM gts_locks "
                "WHERE xid = $1 ORDER BY key FOR UPDATE)",
                xid,
            )
            return int(status.split()[-1])

        return int(await self._journal.run("lock release failed", delete))

    async def holder(self, key: str) -> str | None:
        key = check_key(key)

        async def query(conn: Any) -> str | None:
            found = await conn.fetchval(
                "SELECT xid FROM gts_locks WHERE key = $1 "
                "AND (expires_at IS NULL OR expires_at > now())",
                key,
            )
            return None if found is None else str(found)

        found: str | None = await self._journal.run("lock read failed", query)
        return found

    def may_hold(self, xid: str) -> bool:
        return True  # another replica may have taken it: only the database knows

    async def close(self) -> None:
        pass  # the journal's pool is the journal's to close
