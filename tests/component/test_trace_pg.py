"""The PostgreSQL journal keeps a transaction's traceparent (migration 3), so phase two after
a failover or restart still belongs to its trace; a database at version 2 is migrated."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from sidecar.coordinator.pg_journal import PgJournal
from sidecar.coordinator.pg_schema import MIGRATIONS, SCHEMA_VERSION, migrate
from sidecar.coordinator.records import GlobalRecord
from sidecar.coordinator.states import GlobalStatus
from tests.pg_server import PgCluster, pg_server, pg_url  # noqa: F401

T0 = 1_700_000_000_000
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
async def pg(pg_server: PgCluster, pg_url: str) -> AsyncIterator[PgJournal]:  # noqa: F811
    j = PgJournal(pg_url, password=pg_server.password, statement_timeout=2.0, pool_size=2)
    await j.open()
    await j.join("replica-1", 60.0)
    yield j
    await j.close()


async def test_traceparent_round_trip(pg: PgJournal) -> None:
    assert SCHEMA_VERSION >= 3
    record = GlobalRecord(
        "10.0.0.1:17020:1", "order", GlobalStatus.BEGIN, 60_000, T0, T0, None, None, TRACEPARENT
    )
    untraced = GlobalRecord("10.0.0.1:17020:2", "order", GlobalStatus.BEGIN, 60_000, T0, T0)
    await pg.write([record, untraced])
    found = await pg.find(record.xid)
    assert found is not None and found[0] == record
    other = await pg.find(untraced.xid)
    assert other is not None and other[0].traceparent is None
    mine = {g.xid: g for g, _ in await pg.unfinished()}
    assert mine[record.xid].traceparent == TRACEPARENT


async def test_a_version_2_database_is_migrated(pg_server: PgCluster, pg_url: str) -> None:  # noqa: F811
    import asyncpg

    conn = await asyncpg.connect(pg_url, password=pg_server.password)
    try:
        # a database as version 2 left it
        for _, statements in MIGRATIONS[:2]:
            for statement in statements:
                await conn.execute(statement)
        await conn.execute(
            "CREATE TABLE gts_schema_version (version integer PRIMARY KEY, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute("INSERT INTO gts_schema_version (version) VALUES (1), (2)")
        assert await migrate(conn) == list(range(3, SCHEMA_VERSION + 1))
        columns = {
            r["column_name"]
            for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'gts_globals'"
            )
        }
        assert "traceparent" in columns
    finally:
        await conn.close()
