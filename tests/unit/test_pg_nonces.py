"""The shared replay cache's batching (coordinator/pg_nonces.py) without a database: checks
queued together go in one statement, a nonce twice in one batch is a replay, and a failed
statement fails its checks (JournalUnavailable) instead of leaving them waiting."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar.coordinator.pg_nonces import PgNonceStore
from sidecar.errors import JournalUnavailable


class FakeJournal:
    """Answers the nonce statement as the table would: a nonce is fresh the first time."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.seen: set[tuple[str, str]] = set()
        self.statements = 0
        self.fail = fail

    async def fetch_unflushed(self, what: str, sql: str, *args: Any) -> list[Any]:
        self.statements += 1
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        fresh = []
        for key_id, nonce in zip(args[0], args[1], strict=True):
            if (key_id, nonce) not in self.seen:
                self.seen.add((key_id, nonce))
                fresh.append((key_id, nonce))
        return fresh


async def test_checks_are_batched_and_replays_found() -> None:
    journal = FakeJournal()
    store = PgNonceStore(journal)  # type: ignore[arg-type]
    nonces = [f"{n:032x}" for n in range(20)]
    seen = await asyncio.gather(*(store.seen("k1", n, 600) for n in [*nonces, nonces[3]]))
    assert seen == [False] * 20 + [True]
    assert journal.statements <= 3  # 21 checks, at most two flushers' worth of statements
    assert await store.seen("k1", nonces[0], 600) is True


@pytest.mark.parametrize("error", [RuntimeError("a bug"), JournalUnavailable("db down")])
async def test_a_failed_statement_fails_its_checks(error: BaseException) -> None:
    store = PgNonceStore(FakeJournal(fail=error))  # type: ignore[arg-type]
    results = await asyncio.wait_for(
        asyncio.gather(*(store.seen("k1", f"{n:032x}", 600) for n in range(5)),
                       return_exceptions=True),
        timeout=5,
    )  # fmt: skip
    assert all(isinstance(r, JournalUnavailable) for r in results), results
