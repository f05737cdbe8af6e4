"""SQLite files beside the journal (the fence, the locks, the outbox): opened durable, and
emptied in small batches that give their space back.

Opening: WAL with `synchronous=FULL` (a commit that returned is on disk, WAL included), a
busy timeout for the moment two processes meet, the schema created if missing, and
`auto_vacuum=INCREMENTAL`. That mode can only be chosen before the first table exists; a
file made without it (by an older sidecar) is converted once, with a full `VACUUM`, the
first time it is opened here.

Retention: deleting every old row in one statement holds the file's write lock for as long
as the delete takes (956 ms for 200k transactions in the journal), and every write waits
behind it. So old rows go `BATCH_ROWS` at a time, one short transaction each, and whoever
runs the batches lets other writes in between; then the freed pages go back to the file
system `VACUUM_PAGES` at a time (`PRAGMA incremental_vacuum`), and the WAL is cut back to
`WAL_LIMIT` bytes at its next checkpoint (`journal_size_limit`).

The blocking functions here run in a worker thread (or the journal's writer thread);
`compact_in_batches` drives them from the loop.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

T = TypeVar("T")

#: rows deleted per transaction: measured ~2 ms per batch of journal rows on the CI VM
#: (2,000 took ~7 ms, with spikes at 14 ms), so a write queued behind one waits a few ms
BATCH_ROWS: Final = 500
#: pages handed back per transaction (4 KiB each: 512 KiB, ~1-2 ms)
VACUUM_PAGES: Final = 128
#: the WAL is truncated to this size at checkpoints (it grows while a backlog is deleted)
WAL_LIMIT: Final = 4 * 1024 * 1024
#: SQLite's code for auto_vacuum=INCREMENTAL
_INCREMENTAL: Final = 2


@dataclass(frozen=True, slots=True)
class Compaction:
    """What one compaction did."""

    #: rows deleted
    rows: int = 0
    #: delete transactions run (the last one short: it found fewer than BATCH_ROWS)
    batches: int = 0
    #: free pages handed back to the file system
    pages: int = 0

    def __add__(self, other: Compaction) -> Compaction:
        return Compaction(
            self.rows + other.rows, self.batches + other.batches, self.pages + other.pages
        )


def prepare(conn: sqlite3.Connection) -> bool:
    """Durability and space settings on a fresh connection, before any schema work.
    Returns True when an existing file was converted to incremental vacuum (a full VACUUM:
    it rewrites the whole file, once)."""
    tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    converted = False
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != _INCREMENTAL:
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect now on an empty file
        if tables:
            conn.execute("VACUUM")  # an existing file needs the rewrite to switch
            converted = True
    conn.execute("PRAGMA journal_mode=WAL").fetchone()
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
    return converted


def open_sqlite(path: str, schema: Sequence[str]) -> sqlite3.Connection:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        prepare(conn)
        for statement in schema:
            conn.execute(statement)
    except BaseException:
        conn.close()
        raise
    return conn


def write_transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run `fn(conn)` in one `BEGIN IMMEDIATE … COMMIT` (rolled back if it raises)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite has rolled back by itself when it cannot
        raise
    return result


def delete_batch(
    conn: sqlite3.Connection, table: str, where: str, args: Sequence[Any], limit: int = BATCH_ROWS
) -> int:
    """Delete at most `limit` rows of `table` matching `where` (in the caller's transaction).
    Returns the rows deleted (cascades not counted)."""
    sql = f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE {where} LIMIT ?)"
    return int(conn.execute(sql, (*args, limit)).rowcount)


def free_pages(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA freelist_count").fetchone()[0])


def vacuum_step(conn: sqlite3.Connection, pages: int = VACUUM_PAGES) -> int:
    """Hand up to `pages` free pages back (in the caller's transaction; the file shrinks at
    the next checkpoint). Returns the pages handed back."""
    before = free_pages(conn)
    # one page per statement: Python's sqlite3 steps a PRAGMA once, and each step of
    # incremental_vacuum frees one page, whatever N says
    for _ in range(min(pages, before)):
        conn.execute("PRAGMA incremental_vacuum(1)")
    return before - free_pages(conn)


#: run(fn) → fn(conn) run in ONE write transaction, alone on the connection (the store's
#: lock, or the journal's writer thread), off the event loop
Runner = Callable[[Callable[[sqlite3.Connection], int]], Awaitable[int]]


async def compact_in_batches(
    run: Runner,
    table: str,
    where: str,
    args: Sequence[Any],
    *,
    limit: int = BATCH_ROWS,
) -> Compaction:
    """Delete every row of `table` matching `where`, `limit` rows per transaction, each batch
    a separate `run` (so the store's other writes get in between), then give the freed
    pages back, `VACUUM_PAGES` per `run`."""
    rows = batches = 0
    while True:
        deleted = await run(lambda conn: delete_batch(conn, table, where, args, limit))
        rows += deleted
        batches += 1
        if deleted < limit:
            break
    pages = await vacuum(run) if rows else 0
    return Compaction(rows, batches, pages)


async def vacuum(run: Runner) -> int:
    """Give every free page back, VACUUM_PAGES per transaction."""
    pages = 0
    while True:
        step = await run(vacuum_step)
        pages += step
        if step < VACUUM_PAGES:
            return pages


def checkpoint(conn: sqlite3.Connection) -> int:
    """Copy the WAL into the database and truncate the WAL (pages handed back by vacuum
    leave the database file here). Blocking, outside any transaction. Returns the WAL frames
    checkpointed (0 when a reader kept it from completing)."""
    busy, _, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return 0 if busy else int(done)


def file_bytes(path: str) -> int:
    """Bytes on disk of a SQLite file with its WAL (0 for what does not exist)."""
    total = 0
    for name in (path, path + "-wal"):
        try:
            total += os.path.getsize(name)
        except OSError:
            pass
    return total
