"""Fence retention under load: a fence file holding N finished branches (default 200,000) is
compacted (sidecar/txn/fence_store.py: batches, incremental vacuum, checkpoints) while a
writer keeps writing fence rows (each write awaited, as the participant does). Prints the
compaction's batches and time, each batch's time, the concurrent writes' waits, the same
writes alone for comparison, and the file before and after.

    .venv/bin/python bench/fence_retention.py [--rows 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchkit import REPO_DIR, cpu_model, positive_int

sys.path.insert(0, str(REPO_DIR))

from sidecar.txn.fence import FenceState  # noqa: E402
from sidecar.txn.fence_store import FenceRow, SqliteFenceStore  # noqa: E402
from sidecar.txn.sqlite_file import file_bytes  # noqa: E402


def _ms(values: list[float], share: float) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * share))] * 1000


async def writes_alone(directory: Path, seconds: float = 1.0) -> list[float]:
    store = SqliteFenceStore(str(directory / "alone.fence"))
    await store.open()
    waits: list[float] = []
    end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < end:
        t = time.perf_counter()
        await store.put(FenceRow(f"10.0.0.6:17020:{i}", i, "inv", FenceState.TRYING, 1))
        waits.append(time.perf_counter() - t)
        i += 1
    await store.close()
    return waits


async def compaction(directory: Path, rows: int) -> None:
    path = directory / "j.db.fence"
    store = SqliteFenceStore(str(path))
    await store.open()
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            "INSERT INTO fence (xid, branch_id, resource, state, updated_ms) VALUES (?,?,?,?,?)",
            (
                (f"10.0.0.5:17020:{i}", i, "inventory-deduct", "confirmed", 1000)
                for i in range(rows)
            ),
        )
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    before = file_bytes(str(path))

    batch_times: list[float] = []
    run: Callable[..., object] = store._run

    async def timed(fn):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        result = await run(fn)  # type: ignore[misc]
        batch_times.append(time.perf_counter() - t)
        return result

    store._run = timed  # type: ignore[method-assign]
    waits: list[float] = []
    stop = False

    async def writer() -> None:
        i = 0
        while not stop:
            t = time.perf_counter()
            await store.put(FenceRow(f"10.0.0.6:17020:{i}", i, "inv", FenceState.TRYING, 10**13))
            waits.append(time.perf_counter() - t)
            i += 1

    task = asyncio.get_running_loop().create_task(writer(), name="fence-writer")
    t0 = time.perf_counter()
    removed = await store.compact(2000)
    elapsed = time.perf_counter() - t0
    stop = True
    await task
    done = store.last_compaction
    deletes = batch_times[: done.batches]
    print(
        f"compacted {removed:,} rows in {elapsed:.2f} s: {done.batches} delete transactions "
        f"(median {_ms(deletes, 0.5):.1f} ms, p99 {_ms(deletes, 0.99):.1f} ms, max "
        f"{max(deletes) * 1000:.1f} ms), {done.pages:,} pages handed back"
    )
    print(
        f"fence writes during it: {len(waits)}, median {_ms(waits, 0.5):.1f} ms, p99 "
        f"{_ms(waits, 0.99):.1f} ms, max {max(waits) * 1000:.1f} ms"
    )
    print(f"file: {before:,} -> {file_bytes(str(path)):,} bytes (db + WAL)")
    await store.close()


async def main(rows: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        directory = Path(d)
        alone = await writes_alone(directory)
        print(
            f"fence writes alone: {len(alone)}, median {_ms(alone, 0.5):.1f} ms, p99 "
            f"{_ms(alone, 0.99):.1f} ms, max {max(alone) * 1000:.1f} ms"
        )
        await compaction(directory, rows)
    print(f"({cpu_model()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=positive_int, default=200_000)
    asyncio.run(main(parser.parse_args().rows))
