"""The replay cache of signed requests in the replicas' shared PostgreSQL database, so a
request replayed to another replica is refused too (the `nonces.NonceStore` protocol).

Check and record are one statement (INSERT … ON CONFLICT, which keeps an unexpired row and
replaces an expired one), so two replicas given the same nonce at once cannot both accept
it. Concurrent checks are batched into one statement, like the journal's group commit. The
rows are written with `synchronous_commit = off`: a nonce lost in a database crash can only
shorten the replay protection of a request that was answered just before the crash (its
timestamp still bounds it), and it saves a WAL flush per signed request. Expired rows are
deleted by the journal's compaction.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final

from sidecar.coordinator.pg_journal import PgJournal
from sidecar.errors import JournalUnavailable

_MAX_BATCH: Final = 512
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
