"""The engine's unit and property tests (tests/unit/test_engine.py), run again with the
PostgreSQL journal under them instead of the in-memory one: the same behaviour on both.

Every test of that module is imported here, and its `RecordingJournal` (the journal the
`make` fixture and the property test build) is replaced, for the tests of this module, by
the same recorder over a PgJournal joined as a replica on a real PostgreSQL (tests/pg_server).
The few tests that open a SqliteJournal themselves (restarts on one file) keep it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence

import pytest

import tests.unit.test_engine as engine_tests
from sidecar.coordinator.pg_journal import PgJournal
from sidecar.coordinator.records import BranchRecord, GlobalRecord
from sidecar.coordinator.states import GlobalStatus
from sidecar.errors import JournalUnavailable
from tests.pg_server import PgCluster, pg_server  # noqa: F401
from tests.unit.test_engine import *  # noqa: F403

# restarts of one SQLite file: they test that journal, not this one
for _name in [n for n in dir(engine_tests) if n.startswith("test_restart_")]:
    globals().pop(_name, None)


class PgRecordingJournal(PgJournal):
    """RecordingJournal's knobs over a PgJournal that joins as a replica when opened."""

    dsn = ""

    def __init__(self) -> None:
        super().__init__(self.dsn, statement_timeout=5.0, pool_size=4)
        self.history: dict[str, list[GlobalStatus]] = {}
        self.fail = False
        self.fail_next = 0
        self.fail_branch_writes = False
        self.failures = 0

    async def open(self) -> None:
        await super().open()
        if self.token is None:
            await self.join("engine-test", 60.0)

    async def write(
        self,
        globals_: Sequence[GlobalRecord] = (),
        branches: Sequence[BranchRecord] = (),
    ) -> None:
        if self.fail or (self.fail_branch_writes and branches) or self.fail_next:
            await asyncio.sleep(0)
            self.fail_next = max(0, self.fail_next - 1)
            self.failures += 1
            raise JournalUnavailable("journal write failed: disk I/O error (test)")
        await super().write(globals_, branches)
        for g in globals_:
            self.history.setdefault(g.xid, []).append(g.status)


@pytest.fixture(scope="module")
def pg_db(pg_server: PgCluster) -> str:  # noqa: F811
    return pg_server.create_database()


@pytest.fixture(autouse=True)
def _pg_journal(
    pg_server: PgCluster,  # noqa: F811
    pg_db: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[None]:
    # each test starts from empty tables, as each had a new MemoryJournal
    if pg_server.psql("SELECT to_regclass('gts_globals') IS NOT NULL", pg_db).strip() == "t":
        pg_server.psql("TRUNCATE gts_globals, gts_branches, gts_replicas, gts_nonces", pg_db)
    monkeypatch.setattr(PgRecordingJournal, "dsn", pg_server.dsn(pg_db))
    monkeypatch.setattr(engine_tests, "RecordingJournal", PgRecordingJournal)
    yield


async def test_this_module_runs_on_postgresql(make):
    rig = await make()
    assert isinstance(rig.journal, PgJournal)
    record = await rig.engine.begin("order", 1000)
    assert (await rig.journal.find(record.xid))[0] == record
