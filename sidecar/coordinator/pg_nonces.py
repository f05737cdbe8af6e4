"""The replay cache of signed requests in the replicas' shared PostgreSQL database, so a
request replayed to another replica is refused too (the `nonces.NonceStore` protocol).

Check and record are one statement (INSERT … ON CONFLICT, which keeps an unexpired row and
replaces an expired one), so two replicas given the same nonce at once cannot both accept
it. Concurrent checks are batched into one statement, like the journal's group commit. The
rows are written with `synchronous_commit = off`: a nonce lost in a database crash can only
shorten the replay protection of a request that was answered just before the crash (its
timestamp still bounds it), and it saves a WAL flush per signed request. Expired rows are
swept every `interval` (the replica's lease) in short statements (SKIP LOCKED: replicas
sweeping at once split the rows), so the table holds about one replay window of nonces
rather than everything since the journal's last compaction (up to an hour: at 2,000
transactions a second, millions of rows, whose indexes every insert updates).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Final

from sidecar.coordinator.pg_journal import PgJournal
from sidecar.errors import JournalUnavailable

log = logging.getLogger("sidecar.replica")

_MAX_BATCH: Final = 512
#: expired rows deleted per sweep statement (short row locks)
_SWEEP_BATCH: Final = 2000
#: sweep statements per interval at most (the rest waits for the next sweep)
_SWEEP_STATEMENTS: Final = 50
_SWEEP: Final = (
    "WITH gone AS (DELETE FROM gts_nonces WHERE ctid IN (SELECT ctid FROM gts_nonces "
    "WHERE expires_at < now() LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING 1) "
    "SELECT count(*) FROM gone"
)
#: statements in flight at once (one runs while the next batch fills)
_FLUSHERS: Final = 2

_CHECK: Final = (
    "INSERT INTO gts_nonces (key_id, nonce, expires_at) "
    "SELECT k, n, now() + t * interval '1 second' "
    "FROM unnest($1::text[], $2::text[], $3::float8[]) AS u(k, n, t) "
    "ON CONFLICT (key_id, nonce) DO UPDATE SET expires_at = excluded.expires_at "
    "WHERE gts_nonces.expires_at < now() "
    "RETURNING key_id, nonce"
)


@dataclass(slots=True)
class _Check:
    key_id: str
    nonce: str
    ttl: float
    future: asyncio.Future[bool]


class PgNonceStore:
    def __init__(self, journal: PgJournal) -> None:
        self._journal = journal
        self._queue: list[_Check] = []
        self._flushers: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    # --- the sweep of expired rows ------------------------------------------------------------

    def start_sweeping(self, interval: float) -> None:
        self._sweeper = asyncio.ensure_future(self._sweep_every(interval))
        self._sweeper.set_name("nonce-sweep")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None

    async def _sweep_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except JournalUnavailable:
                pass  # the lease beat reports the database's state; the rows wait
            except Exception:  # a bug: keep sweeping
                log.exception("nonce sweep failed")

    async def sweep(self) -> int:
        """Delete expired rows, a batch per statement, until none is left (or the
        interval's share is done); returns how many went."""
        removed = 0
        for _ in range(_SWEEP_STATEMENTS):
            rows = await self._journal.fetch_unflushed("nonce sweep failed", _SWEEP, _SWEEP_BATCH)
            n = int(rows[0][0])
            removed += n
            if n < _SWEEP_BATCH:
                break
        return removed

    # --- checks -------------------------------------------------------------------------------

    async def seen(self, key_id: str, nonce: str, ttl_seconds: float) -> bool:
        check = _Check(key_id, nonce, ttl_seconds, asyncio.get_running_loop().create_future())
        self._queue.append(check)
        if len(self._flushers) < _FLUSHERS:
            task = asyncio.ensure_future(self._flush())
            task.set_name("nonce-flush")
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)
        return await check.future

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
            # the same nonce twice in one batch: the later ones are replays already
            first: dict[tuple[str, str], _Check] = {}
            for c in batch:
                if (c.key_id, c.nonce) in first:
                    if not c.future.done():
                        c.future.set_result(True)
                else:
                    first[(c.key_id, c.nonce)] = c
            checks = list(first.values())
            try:
                fresh = await self._insert(checks)
            except Exception as exc:  # JournalUnavailable, or a bug: never leave a check waiting
                failure = (
                    exc
                    if isinstance(exc, JournalUnavailable)
                    else JournalUnavailable(f"nonce check failed: {type(exc).__name__}: {exc}")
                )
                for c in checks:
                    if not c.future.done():
                        c.future.set_exception(failure)
                continue
            for c in checks:
                if not c.future.done():
                    c.future.set_result((c.key_id, c.nonce) not in fresh)

    async def _insert(self, checks: list[_Check]) -> set[tuple[str, str]]:
        rows = await self._journal.fetch_unflushed(
            "nonce check failed",
            _CHECK,
            [c.key_id for c in checks],
            [c.nonce for c in checks],
            [c.ttl for c in checks],
        )
        return {(r[0], r[1]) for r in rows}
