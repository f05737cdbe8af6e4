"""Journal retention under load, and the bytes a transaction costs on disk.

1. Sizing: begin+commit transactions (no branch), then transactions with one TCC branch
   (register, phase-one report, confirm), written by the real engine to a real SQLite
   journal; bytes per transaction = the file after a checkpoint / transactions.
2. Compaction: a journal holding N finished transactions (default 200,000, one branch
   each) is compacted while writers keep writing (begin + commit records, each write
   awaited, as the engine does); prints the longest and p99 write wait during compaction,
   the batches, and the file before and after. `--single` compacts with the old single
   DELETE for comparison.

    .venv/bin/python bench/journal_retention.py [--transactions 200000] [--writers 4] [--single]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchkit import REPO_DIR, cpu_model, positive_int

sys.path.insert(0, str(REPO_DIR))

import sidecar.coordinator.journal as journal_module  # noqa: E402
from sidecar.config import PhaseTwoRetry  # noqa: E402
from sidecar.coordinator.engine import Engine  # noqa: E402
from sidecar.coordinator.journal import _SCHEMA, SqliteJournal  # noqa: E402
from sidecar.coordinator.records import BranchRecord, GlobalRecord  # noqa: E402
from sidecar.coordinator.states import BranchStatus, BranchType, GlobalStatus  # noqa: E402
from sidecar.txn.sqlite_file import checkpoint, prepare  # noqa: E402

APP_DATA = b'{"sku":"SKU-000042","qty":1,"order":"ord-7f3a9c2e"}'
CALLBACK = "http://10.1.2.3:17020/gts/branch"


class Confirms:
    async def phase_two(self, branch: BranchRecord, commit: bool) -> str | None:
        return None


async def sizing(directory: Path, count: int, keyed: bool) -> tuple[float, float]:
    """Bytes per begin+commit, and per transaction with one branch. `keyed`: as over GTS
    REST v1 (a sidecar calling a coordinator), every begin and registration carries an
    idempotency key (32 hex) and its request hash (64 hex), kept in unique indexes."""
    out = []
    for branches in (0, 1):
        path = directory / f"size-{branches}-{keyed}.db"
        journal = SqliteJournal(str(path))
        await journal.open()
        engine = Engine(
            journal, Confirms(), owner_host="10.1.2.3", owner_port=17020,
            policy=PhaseTwoRetry(),
        )  # fmt: skip
        await engine.start()
        empty = journal.size_bytes()

        async def one(engine: Engine, branches: int, n: int) -> None:
            key, digest = (uuid.uuid4().hex, hashlib.sha256(b"%d" % n).hexdigest())
            tx = await engine.begin(
                "create-order", 60_000,
                idempotency_key=key if keyed else None, request_hash=digest if keyed else None,
            )  # fmt: skip
            if branches:
                b = await engine.register(
                    tx.xid, BranchType.TCC, "inventory", CALLBACK, APP_DATA,
                    idempotency_key=uuid.uuid4().hex if keyed else None,
                    request_hash=digest if keyed else None,
                )  # fmt: skip
                await engine.report(tx.xid, b.branch_id, BranchStatus.PHASE_ONE_DONE)
            await engine.commit(tx.xid, wait=5.0)

        for first in range(0, count, 200):
            await asyncio.gather(
                *(one(engine, branches, n) for n in range(first, min(count, first + 200)))
            )
        await engine.stop(5.0)
        await journal._call(checkpoint, "checkpoint", bare=True)
        out.append((journal.size_bytes() - empty) / count)
        await journal.close()
    return out[0], out[1]


def fill(path: Path, count: int, updated_ms: int) -> None:
    """`count` committed transactions with one confirmed branch each, straight into SQLite."""
    conn = sqlite3.connect(path, isolation_level=None)
    prepare(conn)
    for statement in _SCHEMA:
        conn.execute(statement)
    conn.execute("INSERT INTO schema_version VALUES (1, 0)")
    conn.execute("BEGIN")
    for n in range(count):
        xid = f"10.1.2.3:17020:{10**15 + n}"
        conn.execute(
            "INSERT INTO globals VALUES (?, 'create-order', 'Committed', 60000, ?, ?, NULL, NULL)",
            (xid, updated_ms, updated_ms),
        )
        conn.execute(
            "INSERT INTO branches VALUES (?, ?, 0, 'TCC', 'inventory', ?, ?, "
            "'PhaseTwo_Committed', 1, 0, ?, NULL, ?, NULL)",
            (10**15 + n, xid, CALLBACK, APP_DATA, updated_ms, f"reg-{n}"),
        )
    conn.execute("COMMIT")
    checkpoint(conn)
    conn.close()


async def compaction(directory: Path, count: int, writers: int, single: bool) -> dict[str, float]:
    path = directory / "compact.db"
    fill(path, count, updated_ms=1_000)
    journal = SqliteJournal(str(path))
    await journal.open()
    before = journal.size_bytes()
    waits: list[float] = []
    stop = asyncio.Event()

    async def writer(w: int) -> None:
        n = 0
        while not stop.is_set():
            now = time.time_ns() // 1_000_000
            g = GlobalRecord(f"10.1.2.4:17020:{w * 10**9 + n}", "load", GlobalStatus.BEGIN,
                             60_000, now, now)  # fmt: skip
            for record in (g, g.with_status(GlobalStatus.COMMITTED, now)):
                t0 = time.perf_counter()
                await journal.write([record])
                waits.append(time.perf_counter() - t0)
            n += 1

    # how long each compaction job holds the writer thread (BEGIN to COMMIT, fsync included):
    # the most a write queued behind it waits for it, whatever the machine's load adds
    held: list[float] = []
    run = journal_module._run_transaction

    def timed(conn: sqlite3.Connection, fn: Callable[[], Any], *, writes: bool) -> Any:
        t0 = time.perf_counter()
        try:
            return run(conn, fn, writes=writes)
        finally:
            held.append(time.perf_counter() - t0)

    journal_module._run_transaction = timed
    tasks = [asyncio.ensure_future(writer(w)) for w in range(writers)]
    await asyncio.sleep(0.5)  # the load runs before compaction starts
    idle = sorted(waits)
    waits.clear()
    t0 = time.perf_counter()
    if single:
        finished = tuple(s.value for s in GlobalStatus if s.finished)
        removed = await journal._call(
            lambda c: (
                c.execute(
                    f"DELETE FROM globals WHERE status IN ({','.join('?' * len(finished))}) "
                    "AND updated_ms < ?",
                    (*finished, 5_000),
                ).rowcount
            ),
            "single delete",
            writes=True,
        )
    else:
        removed = await journal.compact(5_000)
    took = time.perf_counter() - t0
    journal_module._run_transaction = run
    held.sort()
    stop.set()
    await asyncio.gather(*tasks)  # the writes that waited behind the last job count too
    during = sorted(waits)
    after = journal.size_bytes()
    await journal.close()
    done = journal.last_compaction
    return {
        "removed": removed,
        "seconds": took,
        "batches": done.batches,
        "pages": done.pages,
        "writes": len(during),
        "max_ms": during[-1] * 1000 if during else 0.0,
        "p99_ms": during[int(len(during) * 0.99)] * 1000 if during else 0.0,
        "idle_max_ms": idle[-1] * 1000 if idle else 0.0,
        "held_max_ms": held[-1] * 1000 if held else 0.0,
        "held_p99_ms": held[int(len(held) * 0.99)] * 1000 if held else 0.0,
        "held_p50_ms": held[len(held) // 2] * 1000 if held else 0.0,
        "jobs": len(held),
        "idle_p99_ms": idle[int(len(idle) * 0.99)] * 1000 if idle else 0.0,
        "before": before,
        "after": after,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transactions", type=positive_int, default=200_000)
    parser.add_argument("--writers", type=positive_int, default=4)
    parser.add_argument("--sizing", type=positive_int, default=5_000,
                        help="transactions per sizing run")  # fmt: skip
    parser.add_argument("--single", action="store_true", help="the old single DELETE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="journal-retention-") as tmp:
        directory = Path(tmp)
        for keyed, how in ((False, "embedded, TM API"), (True, "over GTS REST v1, with keys")):
            plain, one_branch = await sizing(directory, args.sizing, keyed)
            print(f"bytes per begin+commit ({how}):              {plain:5.0f}")
            print(f"bytes per transaction with 1 branch ({how}): {one_branch:5.0f}")
        r = await compaction(directory, args.transactions, args.writers, args.single)
    how = "one DELETE (old)" if args.single else "batches"
    print(
        f"compaction of {r['removed']:,} finished transactions ({how}) under {args.writers} "
        f"writers: {r['seconds']:.2f} s, {r['batches']} batches, {r['pages']} pages given back"
    )
    print(
        f"write wait during compaction: max {r['max_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms "
        f"over {r['writes']:,} writes (before it: max {r['idle_max_ms']:.1f} ms, "
        f"p99 {r['idle_p99_ms']:.1f} ms)"
    )
    print(
        f"each compaction job (batch or vacuum step) held the writer thread: "
        f"p50 {r['held_p50_ms']:.1f} ms, p99 {r['held_p99_ms']:.1f} ms, max "
        f"{r['held_max_ms']:.1f} ms over {r['jobs']} jobs"
    )
    print(f"journal file: {r['before'] / 2**20:.1f} MiB -> {r['after'] / 2**20:.1f} MiB")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"machine: {os.cpu_count()} CPUs, {cpu_model()}, SQLite {sqlite3.sqlite_version}, "
        f"load average {load}"
    )


if __name__ == "__main__":
    asyncio.run(main())
