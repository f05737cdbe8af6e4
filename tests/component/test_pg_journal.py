"""The PostgreSQL journal (sidecar/coordinator/pg_journal.py) and its replay cache
(pg_nonces.py) on a real PostgreSQL (tests/pg_server.py): migrations, group commit, the
fence, leases and takeover, the shared nonce cache, errors; and the config and CLI around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
import yaml

from sidecar import config as configmod
from sidecar.coordinator.pg_journal import PgJournal
from sidecar.coordinator.pg_lease import open_replica
from sidecar.coordinator.pg_nonces import PgNonceStore
from sidecar.coordinator.pg_schema import SCHEMA_VERSION
from sidecar.coordinator.records import BranchRecord, GlobalRecord
from sidecar.coordinator.states import BranchStatus, BranchType, GlobalStatus
from sidecar.errors import ConfigError, DuplicateKey, JournalUnavailable, NotOwner
from tests.faults.util import wait_until
from tests.pg_server import PgCluster, pg_server, pg_url  # noqa: F401

T0 = 1_700_000_000_000


def g(xid: str, status: GlobalStatus = GlobalStatus.BEGIN, key: str | None = None) -> GlobalRecord:
    return GlobalRecord(xid, "order", status, 60_000, T0, T0, key, None)


def b(branch_id: int, xid: str, seq: int = 0) -> BranchRecord:
    return BranchRecord(
        branch_id, xid, seq, BranchType.TCC, "stock", "http://10.0.0.2:1/cb", b'{"n":1}',
        BranchStatus.PHASE_ONE_DONE, updated_ms=T0,
    )  # fmt: skip


Opener = Callable[..., Awaitable[PgJournal]]


@pytest.fixture
async def journal(pg_server: PgCluster, pg_url: str) -> AsyncIterator[Opener]:  # noqa: F811
    """`await journal(join=True, lease=60.0)` → an open PgJournal on the test's database."""
    opened: list[PgJournal] = []

    async def open_one(*, join: bool = True, lease: float = 60.0) -> PgJournal:
        j = PgJournal(pg_url, password=pg_server.password, statement_timeout=2.0, pool_size=3)
        await j.open()
        opened.append(j)
        if join:
            await j.join(f"replica-{len(opened)}", lease)
        return j

    yield open_one
    for j in opened:
        await j.close()


# --- migrations ---------------------------------------------------------------------------


async def test_migrations_apply_once_even_when_replicas_start_together(journal: Opener) -> None:
    first, second, third = await asyncio.gather(*(journal(join=False) for _ in range(3)))
    applied = sorted((first.migrated, second.migrated, third.migrated))
    assert applied == [[], [], list(range(1, SCHEMA_VERSION + 1))]
    again = await journal(join=False)
    assert again.migrated == []


async def test_a_newer_schema_is_refused(
    journal: Opener,
    pg_server: PgCluster,  # noqa: F811
    pg_url: str,  # noqa: F811
) -> None:
    await journal(join=False)
    pg_server.psql("INSERT INTO gts_schema_version (version) VALUES (99)", pg_url.rsplit("/")[-1])
    newer = PgJournal(pg_url, password=pg_server.password, statement_timeout=2.0)
    with pytest.raises(JournalUnavailable, match="version 99, newer than this coordinator"):
        await newer.open()


async def test_an_unreachable_database_is_a_clear_error_without_the_password() -> None:
    from tests.component.servers import closed_port

    port = closed_port()
    j = PgJournal(
        f"postgresql://gts@127.0.0.1:{port}/db", password="s3cret-pw", statement_timeout=1.0
    )
    with pytest.raises(JournalUnavailable) as err:
        await j.open()
    assert f"127.0.0.1:{port}" in err.value.message
    assert "s3cret-pw" not in err.value.message and "s3cret-pw" not in repr(j)
    with pytest.raises(JournalUnavailable, match="not open"):
        await j.write([g("h:1:1")])


# --- writes ---------------------------------------------------------------------------------


async def test_concurrent_writes_share_commits_and_a_bad_one_fails_alone(journal: Opener) -> None:
    j = await journal()
    xids = [f"10.0.0.1:1:{n}" for n in range(60)]
    await asyncio.gather(*(j.write([g(x)]) for x in xids))
    assert j.writes == 60
    assert j.commits < 60  # group commit: several transactions' writes per commit
    results = await asyncio.gather(
        j.write([g("10.0.0.1:1:100")]),
        j.write(branches=[b(7, "10.0.0.1:1:nope")]),  # a branch of no transaction
        j.write([g("10.0.0.1:1:101")], [b(8, "10.0.0.1:1:101")]),
        return_exceptions=True,
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], JournalUnavailable)
    assert (await j.find("10.0.0.1:1:101")) == (g("10.0.0.1:1:101"), [b(8, "10.0.0.1:1:101")])
    assert await j.find_branch_by_key("none") is None


async def test_a_reused_idempotency_key_is_a_duplicate_key(journal: Opener) -> None:
    j = await journal()
    await j.write([g("h:1:1", key="k")])
    with pytest.raises(DuplicateKey):
        await j.write([g("h:1:2", key="k")])
    assert await j.find("h:1:2") is None
    assert (await j.find_global_by_key("k")) == g("h:1:1", key="k")


# --- the fence, leases and takeover ---------------------------------------------------------


async def test_a_transaction_taken_over_cannot_be_written_by_its_old_driver(
    journal: Opener,
) -> None:
    a, b_ = await journal(), await journal()
    await a.write([g("h:1:1")], [b(1, "h:1:1")])
    adopted = await b_.adopt("h:1:1")
    assert adopted == (g("h:1:1"), [b(1, "h:1:1")])
    with pytest.raises(NotOwner) as err:
        await a.write([g("h:1:1", GlobalStatus.COMMITTING)])
    assert err.value.xids == ("h:1:1",) and not err.value.lease_lost
    # refused writes fail alone in their batch
    results = await asyncio.gather(
        a.write(branches=[b(2, "h:1:1", 1)]), a.write([g("h:1:2")]), return_exceptions=True
    )
    assert isinstance(results[0], NotOwner) and results[1] is None
    assert (await a.find("h:1:1")) == (g("h:1:1"), [b(1, "h:1:1")])
    await b_.write([g("h:1:1", GlobalStatus.COMMITTING)])
    # only Begin transactions move by adoption: a decided one stays with its driver
    assert await a.adopt("h:1:1") is None
    assert [r.xid for r, _ in await b_.unfinished()] == ["h:1:1"]
    assert [r.xid for r, _ in await a.unfinished()] == ["h:1:2"]


async def test_an_expired_lease_is_taken_over_and_its_holder_fenced(journal: Opener) -> None:
    a = await journal(lease=0.5)
    await a.write([g("h:1:1", GlobalStatus.COMMITTING)], [b(1, "h:1:1")])
    await a.write([g("h:1:2", GlobalStatus.COMMITTED)])
    survivor = await journal()
    assert await survivor.reap() == []  # a's lease is still good
    taken = await wait_until(survivor.reap, timeout=10, interval=0.1)
    # its unfinished transaction, with its branches; the finished one stays where it is
    assert taken == [(g("h:1:1", GlobalStatus.COMMITTING), [b(1, "h:1:1")])]
    with pytest.raises(NotOwner) as err:
        await a.write([g("h:1:1", GlobalStatus.COMMITTED)])
    assert err.value.lease_lost
    with pytest.raises(NotOwner):
        await a.write([g("h:1:3")])  # nothing new either: its work would be orphaned
    assert await a.renew(10.0) is False
    assert (await survivor.find("h:1:1"))[0].status is GlobalStatus.COMMITTING  # type: ignore[index]


async def test_a_replica_paused_inside_a_transaction_is_still_taken_over(journal: Opener) -> None:
    """A replica stopped (SIGSTOP, a long GC pause) between two statements of a journal
    transaction holds its row's lock (the fence's FOR KEY SHARE): the reapers, which skip
    locked rows, would never take its work over while it stays paused. PostgreSQL ends such a
    session once it has sat idle in its transaction for the statement timeout."""
    a = await journal(lease=0.5)
    await a.write([g("h:1:1", GlobalStatus.COMMITTING)], [b(1, "h:1:1")])
    survivor = await journal()
    assert a._pool is not None
    paused = await a._pool.acquire()
    try:
        tx = paused.transaction()
        await tx.start()
        await paused.fetchval("SELECT 1 FROM gts_replicas WHERE token = $1 FOR KEY SHARE", a._me())
        # ... and a says nothing more: its lease runs out while the lock is held
        taken = await wait_until(survivor.reap, timeout=15, interval=0.2)
        assert [r.xid for r, _ in taken] == ["h:1:1"]
    finally:
        # (PostgreSQL has ended its session by now; the pool may have let the connection go)
        with contextlib.suppress(asyncpg.InterfaceError):
            await a._pool.release(paused)


async def test_a_renewed_lease_is_not_taken_over_and_leave_hands_over_at_once(
    journal: Opener,
) -> None:
    a = await journal(lease=60.0)
    await a.write([g("h:1:1", GlobalStatus.ROLLBACKING)])
    other = await journal()
    assert await a.renew(60.0) is True
    assert await other.reap() == []
    await a.leave()
    assert [r.xid for r, _ in await other.reap()] == ["h:1:1"]


async def test_compaction_removes_old_finished_transactions_only(journal: Opener) -> None:
    j = await journal()
    await j.write([g("h:1:1", GlobalStatus.COMMITTED)], [b(1, "h:1:1")])
    await j.write([g("h:1:2", GlobalStatus.COMMITTING)])
    assert await j.compact(T0) == 0  # strictly before
    assert await j.compact(T0 + 1) == 1
    assert await j.find("h:1:1") is None
    assert await j.find("h:1:2") is not None


# --- the replay cache -----------------------------------------------------------------------


async def test_a_nonce_is_accepted_once_across_replicas(journal: Opener) -> None:
    one, two = PgNonceStore(await journal()), PgNonceStore(await journal())
    assert await one.seen("k1", "n1", 600) is False
    assert await two.seen("k1", "n1", 600) is True  # replayed to another replica
    assert await two.seen("k2", "n1", 600) is False  # per key id
    # the same nonce twice at once: exactly one passes
    assert sorted(await asyncio.gather(one.seen("k1", "n2", 600), two.seen("k1", "n2", 600))) == [
        False,
        True,
    ]
    assert sorted(await asyncio.gather(one.seen("k1", "n3", 600), one.seen("k1", "n3", 600))) == [
        False,
        True,
    ]
    # an expired entry is recorded anew
    assert await one.seen("k1", "old", -1) is False
    assert await two.seen("k1", "old", 600) is False
    assert await one.seen("k1", "old", 600) is True


# --- config and CLI -------------------------------------------------------------------------


def test_config_takes_a_postgresql_journal_and_refuses_bad_ones(tmp_path: Path) -> None:
    ok = configmod.parse(
        {"local_coordinator": {"journal": "postgresql://gts@db.example:5432/gts", "lease": "4s"}}
    )
    assert ok.local_coordinator.replicated and ok.local_coordinator.lease == 4.0
    assert ok.local_coordinator.beside_journal(".fence") is None
    for url, says in [
        ("postgresql://gts:hunter2@db:5432/gts", "must not hold a password"),
        ("postgresql://gts@db:5432/", "expected postgresql://USER@HOST:PORT/DATABASE"),
        ("postgresql://db:5432/gts", "expected postgresql://USER@HOST:PORT/DATABASE"),
        ("postgresql://gts@db:5432/gts?sslmode=disable", "no query parameters"),
        ("postgresql://gts@db:99999/gts", "invalid PostgreSQL journal URL"),
    ]:
        with pytest.raises(ConfigError) as err:
            configmod.parse({"local_coordinator": {"journal": url}})
        text = "\n".join(err.value.problems)
        assert "local_coordinator.journal" in text and says in text, text
        assert "hunter2" not in text
    for bad in ({"lease": "500ms"}, {"lease": "4s", "statement_timeout": "4s"}):
        with pytest.raises(ConfigError, match="local_coordinator"):
            configmod.parse({"local_coordinator": {"journal": "postgresql://u@h:1/d", **bad}})


async def test_only_the_standalone_coordinator_runs_on_postgresql() -> None:
    cfg = configmod.parse({"local_coordinator": {"journal": "postgresql://u@h:1/d"}})
    with pytest.raises(ConfigError, match="is for replicas of `gts-sidecar coordinator`"):
        await open_replica(cfg, "h:1", standalone=False)


def test_migrate_only(tmp_path: Path, pg_server: PgCluster, pg_url: str) -> None:  # noqa: F811
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "local_coordinator": {
                    "journal": pg_url,
                    "password_file": str(pg_server.password_file),
                }
            }
        )
    )

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sidecar", "coordinator", "--config", str(cfg),
             "--migrate-only"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    first = run()
    assert first.returncode == 0, first.stderr
    assert f"applied now: {list(range(1, SCHEMA_VERSION + 1))}" in first.stdout
    assert run().stdout.strip().endswith("applied now: none")
    db = pg_url.rsplit("/", 1)[1]
    assert pg_server.psql("SELECT max(version) FROM gts_schema_version", db).strip() == str(
        SCHEMA_VERSION
    )
    cfg.write_text(yaml.safe_dump({"local_coordinator": {"journal": "sqlite:///x.db"}}))
    refused = run()
    assert refused.returncode == 2 and "--migrate-only is for a postgresql://" in refused.stderr
