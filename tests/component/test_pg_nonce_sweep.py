"""The shared replay cache's sweep (coordinator/pg_nonces.py) on a real PostgreSQL: expired
nonces go in batches until none is left, live ones stay (a replay of them is still refused),
and the sweeping task does it on its own interval."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from sidecar.coordinator.pg_journal import PgJournal
from sidecar.coordinator.pg_nonces import PgNonceStore
from tests.faults.util import wait_until
from tests.pg_server import PgCluster, pg_server, pg_url  # noqa: F401


@pytest.fixture
async def journal(pg_server: PgCluster, pg_url: str) -> AsyncIterator[PgJournal]:  # noqa: F811
    j = PgJournal(pg_url, password=pg_server.password, statement_timeout=2.0, pool_size=2)
    await j.open()
    await j.join("replica-1", 60.0)
    yield j
    await j.close()


async def expire(journal: PgJournal, n: int) -> None:
    async with journal._pool.acquire() as conn:  # noqa: SLF001
        await conn.execute(
            "INSERT INTO gts_nonces (key_id, nonce, expires_at) SELECT 'k1', md5(n::text), "
            "now() - interval '1 second' FROM generate_series(1, $1) n",
            n,
        )


async def count(journal: PgJournal) -> int:
    async with journal._pool.acquire() as conn:  # noqa: SLF001
        return int(await conn.fetchval("SELECT count(*) FROM gts_nonces"))


async def test_the_sweep_deletes_every_expired_nonce_and_keeps_live_ones(
    journal: PgJournal,
) -> None:
    store = PgNonceStore(journal)
    assert await store.seen("k1", "ab" * 16, 600) is False
    await expire(journal, 4500)
    assert await store.sweep() == 4500
    assert await count(journal) == 1
    assert await store.seen("k1", "ab" * 16, 600) is True  # still a replay


async def test_the_sweeping_task_runs_on_its_interval(journal: PgJournal) -> None:
    store = PgNonceStore(journal)
    store.start_sweeping(0.05)
    try:
        await expire(journal, 300)

        async def swept() -> bool:
            return await count(journal) == 0

        await wait_until(swept, timeout=20)
    finally:
        await store.stop()
