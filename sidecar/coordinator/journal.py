"""The durable transaction journal (SQLite), behind `records.Journal` (its in-memory twin:
memory_journal.py; the row mapping both use: journal_rows.py).

Theory of operation. `SqliteJournal` owns one sqlite3 connection, opened, used and closed by
one dedicated writer thread; the event loop never touches it. Every call (writes, reads,
compaction) is a job on a queue; the thread answers each job's asyncio future with
`loop.call_soon_threadsafe`, so a slow disk or a locked database never blocks the loop.

Durability. The database runs with `journal_mode=WAL` and `synchronous=FULL`: every COMMIT
appends to the WAL file and fsyncs it (fdatasync on Linux) before it returns, and
checkpoints fsync the database file before the WAL is reused. `write()` returns only after
the COMMIT that holds its records has returned, so a write that returned survives a crash of
the process, of the kernel or a power loss (on a disk that honours flushes). The journal's
directory is fsync'd at open, so a newly created database file (and its parents created
here) are on disk too. A write that raised, or that was cancelled while waiting, may or may
not be on disk; a writer must treat it as unknown (the engine re-reads or retries with the
same records: every write is an upsert, so repeating one is harmless).

Group commit. Concurrent `write()` calls queue up while the thread is busy with a commit (an
fsync costs milliseconds); the thread then takes every queued write at once and applies them
all in ONE transaction with ONE commit (one fsync), and only then answers all of them. So
durability costs one fsync per batch, not per write, and throughput grows with concurrency.
If a batch fails, each of its writes is retried in its own transaction, so one bad write
(a constraint violation) fails alone with `JournalUnavailable` and the others succeed.
Jobs are applied in the order they were queued: a read sees every write queued before it.

Errors. Every sqlite3 and OS error is translated here, at the adapter edge, into
`JournalUnavailable` (503 JOURNAL_UNAVAILABLE) whose message says what failed; sqlite3
exceptions never leave this module. A constraint violation (a branch of an unknown
transaction, an idempotency key already used by another record) is such an error too, and
`MemoryJournal` raises the same ones, with the state left unchanged.

Retention. `compact` deletes finished transactions `COMPACT_BATCH` at a time, each batch a job
of its own on the writer thread's queue, so writes queued meanwhile are committed between
two batches instead of waiting for the whole backlog (one DELETE of 200k transactions held
a begin back 956 ms). The file is in `auto_vacuum=INCREMENTAL` mode (an older file is
converted once at open) and compaction hands the freed pages back, a few hundred per job,
then checkpoints the WAL so the files on disk shrink.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

from sidecar.coordinator.journal_rows import BranchRow as _BranchRow
from sidecar.coordinator.journal_rows import GlobalRow as _GlobalRow
from sidecar.coordinator.journal_rows import branch_record as _branch
from sidecar.coordinator.journal_rows import branch_row as _branch_row
from sidecar.coordinator.journal_rows import global_record as _global
from sidecar.coordinator.journal_rows import global_row as _global_row
from sidecar.coordinator.memory_journal import MemoryJournal
from sidecar.coordinator.records import BranchRecord, GlobalRecord, Journal
from sidecar.coordinator.states import GlobalStatus
from sidecar.errors import DuplicateKey, JournalUnavailable
from sidecar.txn.sqlite_file import (
    Compaction,
    checkpoint,
    compact_in_batches,
    file_bytes,
    prepare,
)

__all__ = ["MemoryJournal", "SqliteJournal", "open_journal", "SCHEMA_VERSION"]

T = TypeVar("T")

#: the schema this code writes; a journal with a newer one is refused at open
SCHEMA_VERSION: Final = 1
#: jobs taken off the queue at once: bounds one transaction's size under a backlog
_MAX_BATCH: Final = 1024

_FINISHED: Final = tuple(s.value for s in GlobalStatus if s.finished)
_NOT_FINISHED_SQL: Final = f"status NOT IN ({', '.join('?' * len(_FINISHED))})"

_SCHEMA: Final = (
    """CREATE TABLE schema_version (
        version INTEGER NOT NULL,
        created_ms INTEGER NOT NULL
    )""",
    """CREATE TABLE globals (
        xid TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        timeout_ms INTEGER NOT NULL,
        begin_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL,
        idempotency_key TEXT UNIQUE,
        request_hash TEXT,
        traceparent TEXT
    )""",
    # compaction finds finished transactions by (status, updated_ms): a range per status
    "CREATE INDEX globals_status_updated ON globals(status, updated_ms)",
    """CREATE TABLE branches (
        branch_id INTEGER PRIMARY KEY,
        xid TEXT NOT NULL REFERENCES globals(xid) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        branch_type TEXT NOT NULL,
        resource_id TEXT NOT NULL,
        callback_url TEXT NOT NULL,
        application_data BLOB NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        stuck INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL,
        last_error TEXT,
        idempotency_key TEXT UNIQUE,
        request_hash TEXT
    )""",
    "CREATE INDEX branches_xid_seq ON branches(xid, seq)",
)

_G_COLS: Final = (
    "xid, name, status, timeout_ms, begin_ms, updated_ms, idempotency_key, request_hash, "
    "traceparent"
)
_B_COLS: Final = (
    "branch_id, xid, seq, branch_type, resource_id, callback_url, application_data, status, "
    "attempts, stuck, updated_ms, last_error, idempotency_key, request_hash"
)


def _upsert(table: str, cols: str, key: str) -> str:
    names = [c.strip() for c in cols.split(",")]
    updates = ", ".join(f"{n} = excluded.{n}" for n in names if n != key)
    marks = ", ".join("?" * len(names))
    # ON CONFLICT DO UPDATE, never INSERT OR REPLACE: a replace deletes the row first, and
    # the delete would cascade to the transaction's branches.
    return (
        f"INSERT INTO {table} ({cols}) VALUES ({marks}) ON CONFLICT({key}) DO UPDATE SET {updates}"
    )


#: for files made before globals_status_updated existed (it replaces globals_status)
_MIGRATE: Final = (
    "CREATE INDEX IF NOT EXISTS globals_status_updated ON globals(status, updated_ms)",
    "DROP INDEX IF EXISTS globals_status",
)
#: transactions deleted per batch, each with its branches (ON DELETE CASCADE). Measured with
#: bench/journal_retention.py on a loaded 2-core VM: 100 hold the writer thread 0.6 ms at the
#: median and 10 ms at p99 (250: 3.9 ms and 21 ms); a write queued behind one waits that long
COMPACT_BATCH: Final = 100
_COMPACT_WHERE: Final = f"status IN ({', '.join('?' * len(_FINISHED))}) AND updated_ms < ?"

_UPSERT_GLOBAL: Final = _upsert("globals", _G_COLS, "xid")
_UPSERT_BRANCH: Final = _upsert("branches", _B_COLS, "branch_id")


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _translate(what: str, exc: BaseException) -> BaseException:
    """The edge table: sqlite3 and OS errors (and rows this code cannot decode) become
    JournalUnavailable; anything else is a bug and travels as it is."""
    if isinstance(exc, JournalUnavailable):
        return exc
    if isinstance(exc, sqlite3.IntegrityError) and "idempotency_key" in str(exc):
        dup = DuplicateKey(f"{what}: {exc}")
        dup.__cause__ = exc
        return dup
    if isinstance(exc, sqlite3.Error | OSError | ValueError):
        err = JournalUnavailable(f"{what}: {exc}")
        err.__cause__ = exc
        return err
    return exc


# --- the writer thread's jobs -------------------------------------------------------------


@dataclass(slots=True)
class _Write:
    globals_: list[_GlobalRow]
    branches: list[_BranchRow]
    future: asyncio.Future[None]


@dataclass(slots=True)
class _Call:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    #: what failed, for the error message ("journal read failed")
    what: str
    #: a write transaction (BEGIN IMMEDIATE, counted in `commits`)
    writes: bool
    #: outside any transaction (a WAL checkpoint cannot run in one)
    bare: bool = False


@dataclass(slots=True)
class _Stop:
    future: asyncio.Future[None] | None


_Job = _Write | _Call | _Stop
_Outcome = tuple["asyncio.Future[Any]", BaseException | None, Any]


def _settle(outcomes: list[_Outcome]) -> None:
    """On the loop: answer the futures whose callers still wait."""
    for future, exc, value in outcomes:
        if future.done():  # the caller was cancelled; a write may still have committed
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark an abandoned future's outcome as seen (no "exception never retrieved")."""
    if not future.cancelled():
        future.exception()


def _post(outcomes: list[_Outcome]) -> None:
    """From the writer thread: hand outcomes to their loops, one wake-up per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[0].get_loop(), []).append(outcome)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, items)
        except RuntimeError:  # that loop is closed: nobody is waiting any more
            pass


def _batch_scheduling() -> None:
    """Linux: this thread (the writer) does not preempt the event loop when woken. Without
    it, every hand-over woke the writer on the loop's CPU, where it only found the loop
    holding the GIL and slept again: two context switches for nothing, per batch. Now it runs
    once the loop waits or its time slice ends, and the writes queued meanwhile join its
    batch (measured in degraded mode: the writer's CPU per transaction 56-69 -> 47-52 us).
    A thread asleep on an idle CPU is still woken at once; elsewhere this does nothing."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))  # 0: the calling thread
    except OSError:
        pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # SQLite has rolled back by itself when it cannot


def _run_transaction(conn: sqlite3.Connection, fn: Callable[[], T], *, writes: bool) -> T:
    conn.execute("BEGIN IMMEDIATE" if writes else "BEGIN")
    try:
        result = fn()
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return result


class SqliteJournal:
    """The durable journal: one SQLite file in WAL mode, one writer thread, group commit."""

    def __init__(
        self,
        path: str,
        *,
        clock_ms: Callable[[], int] = _wall_ms,
        busy_timeout: float = 5.0,
    ) -> None:
        self.path = path
        self._clock_ms = clock_ms
        #: how long a write waits for another process's lock before it fails
        self.busy_timeout = busy_timeout
        #: write transactions committed (each one fsync'd): schema, write batches, compaction
        self.commits = 0
        #: write() calls made durable
        self.writes = 0
        #: what the latest compaction did (batches, rows, pages given back)
        self.last_compaction = Compaction()
        #: True when open() converted an older file to incremental vacuum (a full VACUUM)
        self.converted = False
        self._state: Literal["new", "opening", "open", "closing", "closed"] = "new"
        self._queue: queue.SimpleQueue[list[_Job]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: jobs of this loop iteration, handed to the writer thread together at its end
        self._pending: list[_Job] = []

    def __repr__(self) -> str:
        return f"<SqliteJournal {self.path!r} {self._state}>"

    # --- lifecycle (on the loop) -----------------------------------------------------------

    async def open(self) -> None:
        """Start the writer thread; create the directory and the schema if missing."""
        if self._state == "open":
            return
        if self._state in ("opening", "closing"):
            raise JournalUnavailable(f"journal at {self.path!r} is {self._state}")
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        jobs: queue.SimpleQueue[list[_Job]] = queue.SimpleQueue()
        thread = threading.Thread(
            target=self._main, args=(jobs, ready), name="journal-writer", daemon=True
        )
        self._state = "opening"
        self._queue = jobs
        self._thread = thread
        thread.start()
        try:
            await asyncio.shield(ready)
        except asyncio.CancelledError:
            jobs.put([_Stop(None)])  # the thread stops once it has (or has not) opened
            ready.add_done_callback(_retrieve)
            self._state = "closed"
            raise
        except BaseException:
            thread.join()  # it has answered `ready` and is returning
            self._state = "closed"
            raise
        self._state = "open"

    async def close(self) -> None:
        """Finish every write queued so far, then close the database and the thread."""
        if self._state != "open":
            return
        self._state = "closing"
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._submit(_Stop(done))
        try:
            await asyncio.shield(done)
        finally:
            self._state = "closed"
        if self._thread is not None:
            self._thread.join()  # it has answered `done` and is returning
            self._thread = None

    # --- the Journal API (on the loop) -----------------------------------------------------

    async def write(
        self,
        globals_: Sequence[GlobalRecord] = (),
        branches: Sequence[BranchRecord] = (),
    ) -> None:
        """Upsert the records (globals first); returns once they are committed and fsync'd."""
        self._check_open("write")
        if not globals_ and not branches:
            return
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        self._submit(
            _Write([_global_row(g) for g in globals_], [_branch_row(b) for b in branches], future)
        )
        await future

    async def unfinished(self) -> list[tuple[GlobalRecord, list[BranchRecord]]]:
        """Every transaction not in a finished status (oldest begin first), with its branches
        in seq order."""

        def query(conn: sqlite3.Connection) -> list[tuple[GlobalRecord, list[BranchRecord]]]:
            rows = conn.execute(
                f"SELECT {_G_COLS} FROM globals WHERE {_NOT_FINISHED_SQL} ORDER BY begin_ms, xid",
                _FINISHED,
            ).fetchall()
            branches: dict[str, list[BranchRecord]] = {}
            cols = ", ".join(f"b.{c.strip()}" for c in _B_COLS.split(","))
            for row in conn.execute(
                f"SELECT {cols} FROM branches b JOIN globals g ON g.xid = b.xid "
                f"WHERE g.{_NOT_FINISHED_SQL} ORDER BY b.xid, b.seq, b.branch_id",
                _FINISHED,
            ):
                branches.setdefault(row[1], []).append(_branch(row))
            return [(_global(row), branches.get(row[0], [])) for row in rows]

        return await self._call(query, "journal read failed")

    async def find(self, xid: str) -> tuple[GlobalRecord, list[BranchRecord]] | None:
        def query(conn: sqlite3.Connection) -> tuple[GlobalRecord, list[BranchRecord]] | None:
            row = conn.execute(f"SELECT {_G_COLS} FROM globals WHERE xid = ?", (xid,)).fetchone()
            if row is None:
                return None
            branches = conn.execute(
                f"SELECT {_B_COLS} FROM branches WHERE xid = ? ORDER BY seq, branch_id", (xid,)
            ).fetchall()
            return _global(row), [_branch(b) for b in branches]

        return await self._call(query, "journal read failed")

    async def find_global_by_key(self, idempotency_key: str) -> GlobalRecord | None:
        def query(conn: sqlite3.Connection) -> GlobalRecord | None:
            row = conn.execute(
                f"SELECT {_G_COLS} FROM globals WHERE idempotency_key = ?", (idempotency_key,)
            ).fetchone()
            return None if row is None else _global(row)

        return await self._call(query, "journal read failed")

    async def find_branch_by_key(self, idempotency_key: str) -> BranchRecord | None:
        def query(conn: sqlite3.Connection) -> BranchRecord | None:
            row = conn.execute(
                f"SELECT {_B_COLS} FROM branches WHERE idempotency_key = ?", (idempotency_key,)
            ).fetchone()
            return None if row is None else _branch(row)

        return await self._call(query, "journal read failed")

    async def compact(self, finished_before_ms: int) -> int:
        """Delete finished transactions last updated strictly before `finished_before_ms`,
        with their branches (ON DELETE CASCADE), `COMPACT_BATCH` transactions per write
        transaction; then hand the freed pages back and checkpoint. Returns how many
        transactions went."""

        async def run(fn: Callable[[sqlite3.Connection], int]) -> int:
            # each batch queues behind the writes already waiting, and before later ones
            return await self._call(fn, "journal compaction failed", writes=True)

        done = await compact_in_batches(
            run, "globals", _COMPACT_WHERE, (*_FINISHED, finished_before_ms), limit=COMPACT_BATCH
        )
        if done.rows:
            await self._call(checkpoint, "journal checkpoint failed", bare=True)
        self.last_compaction = done
        return done.rows

    def size_bytes(self) -> int:
        """Bytes on disk: the database file and its WAL."""
        return file_bytes(self.path)

    def _check_open(self, what: str) -> None:
        if self._state != "open":
            state = "not open" if self._state in ("new", "opening") else "closed"
            raise JournalUnavailable(
                f"journal {what} failed: the journal at {self.path!r} is {state}"
            )

    async def _call(
        self,
        fn: Callable[[sqlite3.Connection], T],
        what: str,
        *,
        writes: bool = False,
        bare: bool = False,
    ) -> T:
        self._check_open("read" if not writes else "write")
        assert self._loop is not None
        future: asyncio.Future[T] = self._loop.create_future()
        self._submit(_Call(fn, future, what, writes, bare))
        return await future

    def _submit(self, job: _Job) -> None:
        """Queue a job for the writer thread at the end of this loop iteration, with every
        other job of the iteration: one hand-over (and at most one wake-up of the thread)
        per iteration instead of one per job, in order."""
        if not self._pending:
            assert self._loop is not None
            self._loop.call_soon(self._flush)
        self._pending.append(job)

    def _flush(self) -> None:
        jobs, self._pending = self._pending, []
        if self._state == "closed":  # the writer thread is gone: nobody would answer them
            gone = JournalUnavailable(f"the journal at {self.path!r} is closed")
            _settle([(j.future, gone, None) for j in jobs if j.future is not None])
            return
        self._queue.put(jobs)

    # --- the writer thread -----------------------------------------------------------------

    def _main(self, jobs: queue.SimpleQueue[list[_Job]], ready: asyncio.Future[None]) -> None:
        _batch_scheduling()
        try:
            conn = self._connect()
        except BaseException as exc:
            _post([(ready, _translate(f"cannot open journal at {self.path!r}", exc), None)])
            self._fail_queued(jobs, "the journal failed to open")
            return
        _post([(ready, None, None)])
        stop: _Stop | None = None
        taken: list[_Job] = []
        try:
            while stop is None:
                taken = list(jobs.get())
                while len(taken) < _MAX_BATCH:
                    try:
                        taken += jobs.get_nowait()
                    except queue.Empty:
                        break
                stop = self._process(conn, taken)
                taken = []
        except BaseException as exc:  # a bug: answer everyone rather than hang them
            self._state = "closed"  # later calls fail at once instead of queueing to nobody
            failure = JournalUnavailable(f"journal writer stopped: {exc!r}")
            _post([(j.future, failure, None) for j in taken if j.future is not None])
            raise
        finally:
            conn.close()
            self._fail_queued(jobs, f"the journal at {self.path!r} is closed")
        if stop.future is not None:
            _post([(stop.future, None, None)])

    def _connect(self) -> sqlite3.Connection:
        directory = os.path.dirname(os.path.abspath(self.path))
        missing: list[str] = []
        probe = directory
        while not os.path.exists(probe) and os.path.dirname(probe) != probe:
            missing.append(probe)
            probe = os.path.dirname(probe)
        os.makedirs(directory, exist_ok=True)
        # isolation_level=None: no implicit transactions; this code says BEGIN and COMMIT
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        try:
            # WAL, synchronous=FULL, incremental vacuum (an older file converted once)
            self.converted = prepare(conn)
            conn.execute("PRAGMA foreign_keys=ON")
            _run_transaction(conn, lambda: self._ensure_schema(conn), writes=True)
            self.commits += 1
            # make the new file's (and new directories') names durable too
            _fsync_dir(directory)
            for created in missing:
                _fsync_dir(os.path.dirname(created))
        except BaseException:
            conn.close()
            raise
        return conn

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        if exists is None:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (version, created_ms) VALUES (?, ?)",
                (SCHEMA_VERSION, self._clock_ms()),
            )
            return
        (version,) = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        if not isinstance(version, int):
            raise JournalUnavailable(
                f"cannot open journal at {self.path!r}: its schema_version table is empty"
            )
        if version > SCHEMA_VERSION:
            raise JournalUnavailable(
                f"cannot open journal at {self.path!r}: schema version {version} is newer "
                f"than this sidecar supports ({SCHEMA_VERSION})"
            )
        for statement in _MIGRATE:
            conn.execute(statement)
        have = {row[1] for row in conn.execute("PRAGMA table_info(globals)")}
        if "traceparent" not in have:
            # added without a new schema version: a nullable column an older sidecar never
            # names, so rolling back to one still opens the file
            conn.execute("ALTER TABLE globals ADD COLUMN traceparent TEXT")

    def _process(self, conn: sqlite3.Connection, taken: list[_Job]) -> _Stop | None:
        """Apply jobs in queue order: consecutive writes share one transaction."""
        outcomes: list[_Outcome] = []
        writes: list[_Write] = []
        stop: _Stop | None = None
        for job in taken:
            if stop is not None:  # queued after close() (a bug in the caller): refuse
                if job.future is not None:
                    closed = JournalUnavailable(f"the journal at {self.path!r} is closed")
                    outcomes.append((job.future, closed, None))
                continue
            if isinstance(job, _Write):
                writes.append(job)
                continue
            if writes:
                outcomes += self._commit(conn, writes)
                writes = []
            if isinstance(job, _Stop):
                stop = job
            else:
                outcomes.append(self._run_call(conn, job))
        if writes:
            outcomes += self._commit(conn, writes)
        _post(outcomes)
        return stop

    def _commit(self, conn: sqlite3.Connection, writes: list[_Write]) -> list[_Outcome]:
        def fail_all(exc: BaseException) -> list[_Outcome]:
            err = _translate("journal write failed", exc)
            return [(w.future, err, None) for w in writes]

        try:
            conn.execute("BEGIN IMMEDIATE")
        except Exception as exc:  # locked by another process, I/O error: fails them all alike
            return fail_all(exc)
        try:
            self._apply(conn, writes)
        except Exception as exc:
            _rollback(conn)
            if len(writes) == 1:
                return fail_all(exc)
            # one bad write (a constraint) must not fail its batch: each in its own transaction
            return [outcome for w in writes for outcome in self._commit(conn, [w])]
        try:
            conn.execute("COMMIT")
        except Exception as exc:  # disk full, I/O error: nothing of the batch is durable
            _rollback(conn)
            return fail_all(exc)
        self.commits += 1
        self.writes += len(writes)
        return [(w.future, None, None) for w in writes]

    @staticmethod
    def _apply(conn: sqlite3.Connection, writes: Iterable[_Write]) -> None:
        # one statement run per table for the whole batch, not two per write: every global
        # row before every branch row (a branch's transaction exists first), each table's
        # rows in queue order (a later upsert of the same row wins, as it would alone)
        globals_: list[_GlobalRow] = []
        branches: list[_BranchRow] = []
        for w in writes:
            globals_ += w.globals_
            branches += w.branches
        if globals_:
            conn.executemany(_UPSERT_GLOBAL, globals_)
        if branches:
            conn.executemany(_UPSERT_BRANCH, branches)

    def _run_call(self, conn: sqlite3.Connection, job: _Call) -> _Outcome:
        try:
            if job.bare:
                result = job.fn(conn)
            else:
                result = _run_transaction(conn, lambda: job.fn(conn), writes=job.writes)
        except Exception as exc:
            return (job.future, _translate(job.what, exc), None)
        if job.writes:
            self.commits += 1
        return (job.future, None, result)

    @staticmethod
    def _fail_queued(jobs: queue.SimpleQueue[list[_Job]], why: str) -> None:
        outcomes: list[_Outcome] = []
        while True:
            try:
                batch = jobs.get_nowait()
            except queue.Empty:
                break
            for job in batch:
                if job.future is not None:
                    outcomes.append((job.future, JournalUnavailable(why), None))
        _post(outcomes)


def open_journal(url: str) -> Journal:
    """`sqlite:///relative/path.db`, `sqlite:////absolute/path.db` or `memory://` (tests:
    nothing survives the process). The path is taken literally (no URI parameters)."""
    if url == "memory://":
        return MemoryJournal()
    prefix = "sqlite:///"
    if url.startswith(prefix) and len(url) > len(prefix):
        path = url[len(prefix) :]
        if path == ":memory:" or path.endswith("/"):
            raise ValueError(f"invalid journal {url!r}: the path must name a file")
        return SqliteJournal(path)
    raise ValueError(
        f"invalid journal {url!r} (sqlite:///relative/path.db, sqlite:////absolute/path.db, "
        "or memory:// for tests: not durable)"
    )
