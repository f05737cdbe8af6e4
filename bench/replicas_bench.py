"""Replicated coordinator benchmark: begin + commit per second with 1, 2 and 3 replicas of
``gts-sidecar coordinator`` on one PostgreSQL, against one replica on SQLite, in one run.

What it measures: global transactions per second (one signed ``start`` and one signed
``commit``, no branches), the same pair as bench/coordinator_bench.py, whose client worker
processes it reuses (``coordinator_bench.py --worker``: RemoteCoordinator, HMAC-signed, with
Idempotency-Keys). Each replica gets one client process that sends every call to it (the
XID's owner, as a sidecar's affinity does). Durability is the same everywhere: SQLite with
``synchronous=FULL``, PostgreSQL with its defaults (``fsync=on``, ``synchronous_commit=on``):
nothing is acknowledged before its WAL is flushed. PostgreSQL is a cluster of the run's own
(tests/pg_server.py: initdb + pg_ctl on a temporary directory), on the same machine: every
process of every scenario shares its CPUs, so the figures say what this machine does, not
how replicas scale on machines of their own.

Usage (from the repo root)::

    .venv/bin/python bench/replicas_bench.py [--duration 8s] [--warmup 2s] [--concurrency 64]

The markdown report goes to stdout and to bench/results/replicas_latest.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchkit import (
    REPO_DIR,
    BenchError,
    cpu_model,
    die_with_parent,
    parse_seconds,
    positive_int,
    venv_python,
)

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_FILE = BENCH_DIR / "results" / "replicas_latest.md"
KEY_ID = "bench-1"
STARTED_MSG = "gts-sidecar coordinator started"
START_TIMEOUT = 30.0
WORKER_STARTUP = 2.0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=parse_seconds, default=8.0, help="measured time (8s)")
    p.add_argument("--warmup", type=parse_seconds, default=2.0, help="unmeasured lead-in (2s)")
    p.add_argument(
        "--concurrency",
        type=positive_int,
        default=64,
        help="begin→commit loops in flight in all, split over the replicas (64)",
    )
    p.add_argument(
        "--per-replica",
        action="store_true",
        help="--concurrency loops for each replica instead (load that grows with replicas, "
        "as sidecars' would)",
    )
    p.add_argument(
        "--scenarios",
        default="sqlite:1,postgresql:1,postgresql:2,postgresql:3",
        help="journal:replicas, comma-separated (the default runs all four)",
    )
    return p.parse_args(argv)


class Replica:
    """One `gts-sidecar coordinator` process; its peer port from its start-up log line."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        self.popen = subprocess.Popen(
            [venv_python(), "-m", "sidecar", "coordinator", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=REPO_DIR,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self.port = 0
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        with open(self.log, "wb") as out:
            for raw in self.popen.stderr:
                out.write(raw)
                if not self._ready.is_set():
                    with contextlib.suppress(ValueError):
                        rec = json.loads(raw)
                        if rec.get("msg") == STARTED_MSG:
                            self.port = int(rec["ports"]["peer"])
                            self._ready.set()
        self._ready.set()

    def wait_started(self) -> None:
        if not self._ready.wait(START_TIMEOUT) or not self.port:
            self.stop()
            tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise BenchError("a coordinator did not start", tail)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU of these processes so far (/proc/PID/stat; gone ones count 0)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / tick


def postgres_pids(pg: Any) -> list[int]:
    """The postmaster and its children (the backends serving the replicas, the WAL writer)."""
    if pg is None:
        return []
    master = int((pg.data / "postmaster.pid").read_text().split()[0])
    pids = [master]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == master:
                pids.append(int(stat.parent.name))
    return pids


def sleep_until(wall: float) -> None:
    time.sleep(max(0.0, wall - time.time()))


def scenario(
    work: Path, journal: str, replicas: int, args: argparse.Namespace, pg: Any
) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    key_file = work / "signing.key"
    key_file.write_text("bench-signing-secret-" + os.urandom(16).hex() + "\n")
    if journal == "sqlite":
        local: dict[str, Any] = {"journal": f"sqlite:///{work.resolve()}/journal.db"}
    else:
        db = pg.create_database()
        local = {
            "journal": pg.url(db),
            "password_file": str(pg.password_file),
            "pool_size": 8,
        }
    procs: list[Replica] = []
    try:
        for i in range(replicas):
            config = work / f"replica{i}.yaml"
            config.write_text(
                json.dumps(
                    {
                        "listeners": {
                            n: {"bind": "127.0.0.1:0"}
                            for n in ("inbound", "outbound", "api", "peer", "admin")
                        },
                        "logging": {"level": "info", "format": "json"},
                        "drain_timeout": "5s",
                        "coordinator": {
                            "signing": {"key_id": KEY_ID, "secret_file": str(key_file)}
                        },
                        "local_coordinator": local,
                    }
                )
            )
            procs.append(Replica(config, work / f"replica{i}.log"))
        for p in procs:
            p.wait_started()
        now = time.time()
        warm_at = now + WORKER_STARTUP
        start_at = warm_at + args.warmup
        end_at = start_at + args.duration
        workers = []
        per = args.concurrency if args.per_replica else max(1, args.concurrency // replicas)
        for i, p in enumerate(procs):
            result = work / f"worker{i}.json"
            argv = [
                venv_python(), str(BENCH_DIR / "coordinator_bench.py"), "--worker",
                "--url", f"http://127.0.0.1:{p.port}", "--key-file", str(key_file),
                "--concurrency", str(per), "--warm-at", str(warm_at),
                "--start-at", str(start_at), "--end-at", str(end_at),
                "--result-file", str(result),
            ]  # fmt: skip
            workers.append(
                (
                    subprocess.Popen(argv, cwd=REPO_DIR, preexec_fn=die_with_parent),
                    result,
                )
            )
        # CPU of the replicas and of PostgreSQL over the measured window
        sleep_until(start_at)
        watched = [p.popen.pid for p in procs]
        db_pids = postgres_pids(pg) if journal == "postgresql" else []
        cpu0 = cpu_seconds(watched), cpu_seconds(db_pids)
        sleep_until(end_at)
        cpu1 = cpu_seconds(watched), cpu_seconds(db_pids)
        latencies: list[int] = []
        errors: dict[str, int] = {}
        for popen, result in workers:
            if popen.wait(args.warmup + args.duration + 120) != 0:
                raise BenchError(f"a client process exited with {popen.returncode}")
            data = json.loads(result.read_text())
            latencies += data["latencies_us"]
            for code, n in data["errors"].items():
                errors[code] = errors.get(code, 0) + n
        latencies.sort()

        def pct(q: float) -> float:
            return latencies[min(len(latencies) - 1, int(q * len(latencies)))] / 1000

        return {
            "journal": journal,
            "replicas": replicas,
            "tps": len(latencies) / args.duration,
            "p50": pct(0.5) if latencies else 0.0,
            "p99": pct(0.99) if latencies else 0.0,
            "errors": errors,
            # CPU ms per transaction: the replicas together, and PostgreSQL
            "cpu_replicas": (cpu1[0] - cpu0[0]) * 1000 / max(1, len(latencies)),
            "cpu_db": (cpu1[1] - cpu0[1]) * 1000 / max(1, len(latencies)),
        }
    finally:
        for p in procs:
            p.stop()


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO_DIR))
    plan = []
    for item in args.scenarios.split(","):
        journal, _, n = item.partition(":")
        if journal not in ("sqlite", "postgresql") or not n.isdigit() or int(n) < 1:
            raise SystemExit(f"bad scenario {item!r} (journal:replicas, e.g. postgresql:3)")
        plan.append((journal, int(n)))
    pg = None
    if any(j == "postgresql" for j, _ in plan):
        from tests.pg_server import PgCluster, pg_bin

        bindir = pg_bin()
        if bindir is None:
            raise SystemExit("PostgreSQL is not installed (scripts/system-deps.sh installs it)")
        pg = PgCluster(bindir)
        pg.start()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="gts-replicas-bench-") as tmp:
            for n, (journal, replicas) in enumerate(plan):
                print(f"-- {journal} x{replicas} ...", file=sys.stderr, flush=True)
                rows.append(scenario(Path(tmp) / f"s{n}", journal, replicas, args, pg))
    except BenchError as exc:
        exc.report()
        return 2
    finally:
        if pg is not None:
            pg.destroy()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Replicated coordinator: begin+commit tx/s ({stamp})",
        "",
        f"Machine: {os.cpu_count()} CPUs, {cpu_model()}; every process of a scenario "
        f"(replicas, PostgreSQL, clients) shares them. {args.concurrency} loops "
        f"{'per replica' if args.per_replica else 'in all'}, "
        f"{args.duration:g}s measured after {args.warmup:g}s of warm-up.",
        "",
        "| journal | replicas | tx/s | p50 ms | p99 ms | CPU ms/tx replicas | CPU ms/tx PostgreSQL "
        "| errors |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        errs = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "none"
        lines.append(
            f"| {r['journal']} | {r['replicas']} | {r['tps']:,.0f} | {r['p50']:.1f} | "
            f"{r['p99']:.1f} | {r['cpu_replicas']:.2f} | {r['cpu_db']:.2f} | {errs} |"
        )
    lines += ["", f"Command: `.venv/bin/python bench/replicas_bench.py {' '.join(argv)}`".rstrip()]
    report = "\n".join(lines) + "\n"
    RESULTS_FILE.parent.mkdir(exist_ok=True)
    RESULTS_FILE.write_text(report)
    print(report)
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
