"""SqliteJournal on real files: restarts, SIGKILL, group commit, fsync per commit (strace),
the writer thread off the event loop, and failures (unopenable, locked, disk full) turned
into JournalUnavailable with the journal's state unchanged."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from sidecar.coordinator.journal import SCHEMA_VERSION, SqliteJournal
from sidecar.coordinator.records import BranchRecord, GlobalRecord
from sidecar.coordinator.states import BranchStatus, BranchType, GlobalStatus
from sidecar.errors import JournalUnavailable

ROOT = Path(__file__).resolve().parents[2]


def gtx(n: int, name: str = "order") -> GlobalRecord:
    return GlobalRecord(
        xid=f"10.0.0.1:17020:{n}",
        name=name,
        status=GlobalStatus.BEGIN,
        timeout_ms=60_000,
        begin_ms=n,
        updated_ms=n,
        idempotency_key=f"begin-{n}",
    )


def branch(n: int, branch_id: int | None = None) -> BranchRecord:
    return BranchRecord(
        branch_id=n if branch_id is None else branch_id,
        xid=gtx(n).xid,
        seq=0,
        branch_type=BranchType.TCC,
        resource_id="stock",
        callback_url="http://10.0.0.2:17020/gts/branch",
        application_data=b'{"sku": %d, "raw": "\xff"}' % n,
        status=BranchStatus.REGISTERED,
    )


def writer_threads() -> int:
    return sum(t.name == "journal-writer" for t in threading.enumerate())


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[SqliteJournal]:
    j = SqliteJournal(str(tmp_path / "journal.db"))
    await j.open()
    yield j
    await j.close()


class Lock:
    """Another connection (as another process would) holding the database's write lock."""

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        self.conn.close()


# --- restarts -------------------------------------------------------------------------------


async def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "a" / "b" / "journal.db")  # parent directories are created
    first = SqliteJournal(path)
    await first.open()
    await first.write([gtx(1), gtx(2)], [branch(1), branch(2)])
    await first.write([replace(gtx(2), status=GlobalStatus.COMMITTED)])
    await first.close()
    assert writer_threads() == 0

    second = SqliteJournal(path)
    await second.open()
    try:
        assert await second.unfinished() == [(gtx(1), [branch(1)])]
        done = await second.find(gtx(2).xid)
        assert done is not None and done[0].status is GlobalStatus.COMMITTED
        assert done[1] == [branch(2)]
        assert await second.find_global_by_key("begin-1") == gtx(1)
    finally:
        await second.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


async def test_close_finishes_the_writes_queued_before_it(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.db")
    j = SqliteJournal(path)
    await j.open()
    tasks = [asyncio.create_task(j.write([gtx(n)], [branch(n)])) for n in range(50)]
    await asyncio.sleep(0)  # each task has queued its write
    await j.close()
    assert all(t.done() and t.exception() is None for t in tasks)
    with pytest.raises(JournalUnavailable, match="closed"):
        await j.write([gtx(99)])
    again = SqliteJournal(path)
    await again.open()
    try:
        assert len(await again.unfinished()) == 50
    finally:
        await again.close()


WRITER = """
import asyncio, sys
import uvloop
from sidecar.coordinator.journal import SqliteJournal
from tests.component.test_journal_sqlite import branch, gtx

async def main() -> None:
    path, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    j = SqliteJournal(path)
    await j.open()
    if mode == "kill":
        for i in range(n // 2):
            await j.write([gtx(i)], [branch(i)])
        await asyncio.gather(*(j.write([gtx(i)], [branch(i)]) for i in range(n // 2, n)))
        print("written", flush=True)
        await asyncio.sleep(3600)
    for i in range(n):
        await j.write([gtx(i)])
    await j.close()

uvloop.run(main())
"""


async def test_writes_that_returned_survive_sigkill(tmp_path: Path) -> None:
    path, n = str(tmp_path / "journal.db"), 200
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, path, str(n), "kill", cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line == b"written\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    j = SqliteJournal(path)
    await j.open()
    try:
        got = await j.unfinished()
    finally:
        await j.close()
    assert got == [(gtx(i), [branch(i)]) for i in range(n)]


# --- group commit and fsync -----------------------------------------------------------------


async def test_concurrent_writes_share_commits(journal: SqliteJournal) -> None:
    commits, writes = journal.commits, journal.writes
    await asyncio.gather(*(journal.write([gtx(n)], [branch(n)]) for n in range(200)))
    assert journal.writes - writes == 200
    # measured here: 1 commit for the 200 writes; a commit per write would be 200
    assert journal.commits - commits < 200 / 4
    assert len(await journal.unfinished()) == 200


async def test_sequential_writes_commit_each(journal: SqliteJournal) -> None:
    commits = journal.commits
    for n in range(10):
        await journal.write([gtx(n)])
    assert journal.commits - commits == 10


async def test_one_bad_write_fails_alone_in_its_batch(journal: SqliteJournal) -> None:
    await journal.write([gtx(1000)])
    lock = Lock(journal.path)  # holds the writer up so that every write below queues
    try:
        tasks = [
            asyncio.create_task(
                journal.write(branches=[branch(777)])  # its transaction does not exist
                if n == 25
                else journal.write([gtx(n)], [branch(n)])
            )
            for n in range(50)
        ]
        await asyncio.sleep(0)
    finally:
        lock.release()
    commits = journal.commits
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [i for i, r in enumerate(results) if r is not None] == [25]
    assert isinstance(results[25], JournalUnavailable)
    assert "FOREIGN KEY constraint failed" in str(results[25])
    # the batch holding the bad write was retried write by write: more than the 1 or 2
    # commits of the batches themselves
    assert journal.commits - commits >= 3
    assert len(await journal.unfinished()) == 50  # 49 and the one written before


STRACE = shutil.which("strace")


def _count_syncs(trace: str) -> int:
    # with -f, a call interrupted by another thread prints "fsync(5 <unfinished ...>" and
    # later "<... fsync resumed>": count each call once, by its opening line
    return len(re.findall(r"\b(?:fsync|fdatasync)\(", trace))


async def _traced_syncs(tmp_path: Path, writes: int) -> int:
    assert STRACE is not None
    out = tmp_path / f"strace-{writes}.txt"
    db = str(tmp_path / f"journal-{writes}.db")
    proc = await asyncio.create_subprocess_exec(
        STRACE,
        "-f",
        "-e",
        "trace=fsync,fdatasync",
        "-o",
        str(out),
        sys.executable,
        "-c",
        WRITER,
        db,
        str(writes),
        "sequential",
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode(errors="replace")
    return _count_syncs(out.read_text())


async def test_every_commit_is_fsynced(tmp_path: Path) -> None:
    if STRACE is None:
        if os.environ.get("CI") == "true":
            pytest.fail("strace is missing (scripts/system-deps.sh installs it)")
        pytest.skip("strace is not installed")
    k = 25
    baseline = await _traced_syncs(tmp_path, 0)  # open and close alone
    with_writes = await _traced_syncs(tmp_path, k)
    assert with_writes - baseline >= k, (baseline, with_writes)


# --- the event loop stays free ----------------------------------------------------------------


async def test_a_blocked_writer_does_not_block_the_event_loop(journal: SqliteJournal) -> None:
    journal.busy_timeout = 60.0  # applies to the next open
    await journal.close()
    await journal.open()
    ticks_while_waiting = 0
    pending = 0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def heartbeat() -> None:
        nonlocal ticks_while_waiting
        if pending:
            ticks_while_waiting += 1
        if not stop.is_set():
            loop.call_later(0.001, heartbeat)

    async def write(n: int) -> None:
        nonlocal pending
        pending += 1
        try:
            await journal.write([gtx(n)])
        finally:
            pending -= 1

    loop.call_soon(heartbeat)
    lock = Lock(journal.path)
    try:
        blocked = asyncio.create_task(write(1))
        for _ in range(5):  # the loop runs while the writer thread waits for the lock
            await asyncio.sleep(0.01)
        assert not blocked.done()
        assert ticks_while_waiting >= 1
    finally:
        lock.release()
    await blocked
    ticks_while_waiting = 0
    await asyncio.gather(*(write(n) for n in range(2, 300)))
    stop.set()
    assert ticks_while_waiting >= 1
    assert len(await journal.unfinished()) == 299


async def test_a_cancelled_write_leaves_no_stray_error(journal: SqliteJournal) -> None:
    lock = Lock(journal.path)
    try:
        task = asyncio.create_task(journal.write([gtx(1)]))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        lock.release()
    await journal.write([gtx(2)])  # after the cancelled one, in queue order
    # a cancelled write may still have committed (it did here: it was already queued)
    assert await journal.find(gtx(1).xid) == (gtx(1), [])


# --- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["under-a-file", "deep-under-a-file", "is-a-directory"])
async def test_unopenable_location(tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "dir.db").mkdir()
    path = {
        "under-a-file": tmp_path / "file" / "journal.db",
        "deep-under-a-file": tmp_path / "file" / "sub" / "journal.db",
        "is-a-directory": tmp_path / "dir.db",
    }[where]
    j = SqliteJournal(str(path))
    with pytest.raises(JournalUnavailable, match="cannot open journal at") as info:
        await j.open()
    assert str(path) in info.value.message
    assert info.value.code == "JOURNAL_UNAVAILABLE" and info.value.status == 503
    assert not isinstance(info.value, sqlite3.Error | OSError)
    assert writer_threads() == 0
    with pytest.raises(JournalUnavailable, match="closed"):
        await j.write([gtx(1)])


async def test_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(JournalUnavailable, match="file is not a database"):
        await SqliteJournal(str(path)).open()
    assert writer_threads() == 0


async def test_refuses_a_newer_schema_and_leaves_it_alone(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.db")
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, created_ms INTEGER)")
        conn.execute("INSERT INTO schema_version VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    conn.close()
    with pytest.raises(JournalUnavailable, match="schema version 2 is newer .* supports \\(1\\)"):
        await SqliteJournal(path).open()
    conn = sqlite3.connect(path)
    tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    conn.close()
    assert tables == [("schema_version",)]


async def test_locked_database_fails_the_write_and_changes_nothing(tmp_path: Path) -> None:
    j = SqliteJournal(str(tmp_path / "journal.db"), busy_timeout=0.2)
    await j.open()
    try:
        await j.write([gtx(1)], [branch(1)])
        lock = Lock(j.path)
        try:
            with pytest.raises(JournalUnavailable, match="^journal write failed: database is"):
                await j.write([gtx(2)], [branch(2)])
            # reads still work (WAL: readers do not wait for the writer)
            assert await j.unfinished() == [(gtx(1), [branch(1)])]
        finally:
            lock.release()
        assert await j.find(gtx(2).xid) is None
        await j.write([gtx(2)], [branch(2)])  # the journal recovers by itself
        assert len(await j.unfinished()) == 2
    finally:
        await j.close()


DISK_FULL = """
import asyncio, json, resource, signal, sys
from sidecar.coordinator.journal import SqliteJournal
from sidecar.errors import JournalUnavailable
from tests.component.test_journal_sqlite import branch, gtx

async def main() -> None:
    out = {}
    j = SqliteJournal(sys.argv[1])
    await j.open()
    await j.write([gtx(1)], [branch(1)])
    before = await j.unfinished()
    # a file-size limit makes every write past it fail with EFBIG, even for root: the
    # disk is "full" for this process alone
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
    try:
        await j.write([gtx(2, name="x" * 1_000_000)], [branch(2)])
        out["error"] = None
    except JournalUnavailable as exc:
        out["error"] = exc.message
        out["cause"] = type(exc.__cause__).__module__
    out["unchanged"] = await j.unfinished() == before
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    await j.write([gtx(3, name="x" * 1_000_000)])
    out["recovered"] = len(await j.unfinished()) == 2
    await j.close()
    print(json.dumps(out))

asyncio.run(main())
"""


async def test_disk_full_fails_the_write_and_changes_nothing(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        DISK_FULL,
        str(tmp_path / "journal.db"),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode(errors="replace")
    result = json.loads(out)
    # SQLite says "disk I/O error" for EFBIG, "database or disk is full" for ENOSPC
    assert re.match(
        r"journal write failed: (disk I/O error|database or disk is full)$", result["error"]
    ), result
    assert result["cause"] == "sqlite3"  # kept as the cause, never raised itself
    assert result["unchanged"] and result["recovered"], result
