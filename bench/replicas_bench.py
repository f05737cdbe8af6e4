"""Replicated coordinator benchmark: begin + commit per second with 1, 2 and 3 replicas of
``gts-sidecar coordinator`` on one PostgreSQL, against one replica on SQLite, in one run.

What it measures: global transactions per second (one signed ``start`` and one signed
``commit``, no branches, each with the headers a sidecar's RemoteCoordinator sends:
Idempotency-Key on the start, XID on the commit, a traceparent on both). Each replica gets
one client process that sends every call to it (the XID's owner, as a sidecar's affinity
does). The client is lean by default (``--client lean``: this script's own worker, signed
requests over keep-alive connections of bench/lean_http.py, httptools), so that on a shared
2-CPU machine the load generator does not cost more than what it measures;
``--client sidecar`` uses bench/coordinator_bench.py's worker (the sidecar's aiohttp
RemoteCoordinator) instead. Durability is the same everywhere: SQLite with
``synchronous=FULL``, PostgreSQL with ``fsync=on`` and ``synchronous_commit=on``: nothing
is acknowledged before its WAL is flushed. PostgreSQL is a cluster of the run's own
(tests/pg_server.py: initdb + pg_ctl on a temporary directory) with ``pg_stat_statements``
loaded, on the same machine: every process of every scenario shares its CPUs, so the
figures say what this machine does, not how replicas scale on machines of their own.

Every scenario gets the same total load (``--concurrency`` loops in all, split over its
replicas). ``--rounds N`` runs the scenarios interleaved N times (s1 s2 s3 s4 s1 s2 …) and
reports each one's median, so that other load on the machine falls on every row alike.
Besides tx/s and latency, each row gives the CPU time per transaction of the replicas, of
PostgreSQL (postmaster and backends) and of the clients (utime + stime from /proc over the
measured window), and PostgreSQL's statements and WAL flushes per transaction
(pg_stat_statements' calls and pg_stat_wal's wal_sync over the window).

Usage (from the repo root)::

    .venv/bin/python bench/replicas_bench.py [--duration 8s] [--warmup 2s] [--concurrency 64]
        [--rounds 3] [--client lean|sidecar] [--scenarios sqlite:1,postgresql:3]

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
from urllib.parse import quote

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
    p.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="run the scenarios interleaved this many times; report each one's median (1)",
    )
    p.add_argument(
        "--client",
        choices=("lean", "sidecar"),
        default="lean",
        help="lean: signed requests over bench/lean_http.py (default); sidecar: the "
        "sidecar's aiohttp RemoteCoordinator (coordinator_bench.py's worker)",
    )
    p.add_argument(
        "--pg-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a PostgreSQL server setting for the run's cluster (repeatable), e.g. "
        "commit_delay=100; durability settings are refused",
    )
    # a client process (started by the benchmark itself)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--url", "--key-file", "--result-file"):
        p.add_argument(name, help=argparse.SUPPRESS)
    for name in ("--warm-at", "--start-at", "--end-at"):
        p.add_argument(name, type=float, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- the lean client process ----------------------------------------------------------------


def worker_main(args: argparse.Namespace) -> int:
    """`--concurrency` loops of signed begin → commit against `--url` from `--warm-at` to
    `--end-at`; the latencies of the pairs completed in [start-at, end-at) and the errors go
    to `--result-file` as JSON."""
    import uvloop

    sys.path.insert(0, str(REPO_DIR))
    result = uvloop.run(_worker(args))
    Path(args.result_file).write_text(json.dumps(result))
    return 0


async def _worker(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    import orjson

    from bench.lean_http import ClientConnection, build_request
    from sidecar.coordinator import protocol
    from sidecar.coordinator.signing import KeyRing, sign_headers

    ring = KeyRing((KEY_ID, Path(args.key_file).read_text().strip().encode()))
    host, port = args.url.split("://", 1)[1].rsplit(":", 1)
    authority = f"{host}:{port}"
    start_path = f"{protocol.API}/transaction/start"
    start_body = b'{"name":"bench","timeoutMs":60000}'
    latencies: list[int] = []
    errors: dict[str, int] = {}
    first_errors: list[str] = []

    def signed(path: str, body: bytes, key: str | None, xid: str | None) -> bytes:
        now_ms = time.time_ns() // 1_000_000
        headers = sign_headers(ring, "POST", path, "", body, now_ms=now_ms,
                               idempotency_key=key, xid=xid)  # fmt: skip
        headers["Content-Type"] = "application/json"
        # as RemoteCoordinator: the call's span position (a trace of its own here)
        headers["traceparent"] = f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"
        if key is not None:
            headers["Idempotency-Key"] = key
        if xid is not None:
            headers["XID"] = xid
        return build_request("POST", path, authority, body, headers)

    async def pair(conn: ClientConnection) -> None:
        status, raw = await conn.request(signed(start_path, start_body, os.urandom(16).hex(), None))
        if status != 200:
            raise RuntimeError(f"start: HTTP {status} {raw[:200]!r}")
        xid = orjson.loads(raw)["xid"]
        path = f"{protocol.API}/transaction/{quote(xid, safe='')}/commit"
        status, raw = await conn.request(signed(path, b"", None, xid))
        if status != 200:
            raise RuntimeError(f"commit: HTTP {status} {raw[:200]!r}")
        if (got := orjson.loads(raw)["status"]) != "Committed":
            raise RuntimeError(f"commit: status {got}")

    async def loop() -> None:
        conn = await ClientConnection.open(host, int(port))
        try:
            while time.time() < args.end_at:
                t0 = time.perf_counter()
                try:
                    await pair(conn)
                except Exception as exc:
                    code = type(exc).__name__
                    errors[code] = errors.get(code, 0) + 1
                    if len(first_errors) < 3:
                        first_errors.append(str(exc))
                    await asyncio.sleep(0.01)
                    if conn._closed:  # noqa: SLF001 - reconnect after a dropped connection
                        try:
                            conn = await ClientConnection.open(host, int(port))
                        except OSError as err:  # counted; tried again until the end
                            errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                    continue
                if args.start_at <= time.time() < args.end_at:
                    latencies.append(int((time.perf_counter() - t0) * 1_000_000))
        finally:
            conn.close()

    delay = args.warm_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    await asyncio.gather(*(loop() for _ in range(args.concurrency)))
    return {"latencies_us": latencies, "errors": errors, "first_errors": first_errors}


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


def replicas_tail(procs: Sequence[Replica]) -> str:
    """The end of each replica's log, and how it exited, for a failed run's report."""
    out = []
    for i, p in enumerate(procs):
        text = p.log.read_text(errors="replace") if p.log.exists() else ""
        out.append(f"--- replica {i} (exit {p.popen.poll()}):\n{text[-1500:]}")
    return "\n".join(out)


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


def db_counts(pg: Any, db: str, *, reset: bool = False) -> tuple[int, int]:
    """(statements, WAL flushes) since the last reset: pg_stat_statements' calls of
    top-level statements in database `db` (one per round trip: a function's inner
    statements are not counted) and pg_stat_wal's wal_sync (the cluster is the run's own)."""
    if reset:
        pg.psql("SELECT pg_stat_statements_reset(); SELECT pg_stat_reset_shared('wal');", db)
        return 0, 0
    out = pg.psql(
        "SELECT (SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s "
        f"JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = '{db}' AND s.query NOT "
        "LIKE '%pg_stat%'), (SELECT wal_sync FROM pg_stat_wal)",
        db,
    )
    statements, flushes = out.strip().splitlines()[-1].split("|")
    return int(statements), int(flushes)


def sleep_until(wall: float) -> None:
    time.sleep(max(0.0, wall - time.time()))


def scenario(
    work: Path, journal: str, replicas: int, args: argparse.Namespace, pg: Any
) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    key_file = work / "signing.key"
    key_file.write_text("bench-signing-secret-" + os.urandom(16).hex() + "\n")
    db = None
    if journal == "sqlite":
        local: dict[str, Any] = {"journal": f"sqlite:///{work.resolve()}/journal.db"}
    else:
        db = pg.create_database()
        pg.psql("CREATE EXTENSION pg_stat_statements", db)
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
        script = "replicas_bench.py" if args.client == "lean" else "coordinator_bench.py"
        for i, p in enumerate(procs):
            result = work / f"worker{i}.json"
            argv = [
                venv_python(), str(BENCH_DIR / script), "--worker",
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
        # CPU of the replicas, of PostgreSQL and of the clients over the measured window;
        # PostgreSQL's statements and WAL flushes too (the counters reset just before it)
        watched = [p.popen.pid for p in procs]
        clients = [popen.pid for popen, _ in workers]
        if db is not None:
            sleep_until(start_at - 0.3)
            db_counts(pg, db, reset=True)
        sleep_until(start_at)
        db_pids = postgres_pids(pg) if db is not None else []
        groups = (watched, db_pids, clients)
        cpu0 = [cpu_seconds(g) for g in groups]
        sleep_until(end_at)
        cpu1 = [cpu_seconds(g) for g in groups]
        counts = db_counts(pg, db) if db is not None else None
        latencies: list[int] = []
        errors: dict[str, int] = {}
        for popen, result in workers:
            try:
                code = popen.wait(args.warmup + args.duration + 120)
            except subprocess.TimeoutExpired:
                popen.kill()
                code = popen.wait()
            if code != 0:
                raise BenchError(f"a client process exited with {code}", replicas_tail(procs))
            data = json.loads(result.read_text())
            latencies += data["latencies_us"]
            for line in data.get("first_errors", []):
                print(f"   client error: {line}", file=sys.stderr)
            for error, n in data["errors"].items():
                errors[error] = errors.get(error, 0) + n
        if any(p.popen.poll() is not None for p in procs):
            raise BenchError("a replica exited during the run", replicas_tail(procs))
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
            # CPU ms per transaction: the replicas together, PostgreSQL, the clients
            "cpu_replicas": (cpu1[0] - cpu0[0]) * 1000 / max(1, len(latencies)),
            "cpu_db": (cpu1[1] - cpu0[1]) * 1000 / max(1, len(latencies)),
            "cpu_clients": (cpu1[2] - cpu0[2]) * 1000 / max(1, len(latencies)),
            # per transaction completed in the window (those in flight at its edges are
            # a rounding error at thousands per second)
            "statements": counts[0] / max(1, len(latencies)) if counts else None,
            "flushes": counts[1] / max(1, len(latencies)) if counts else None,
        }
    finally:
        for p in procs:
            p.stop()


#: what the benchmark's PostgreSQL adds to the defaults: statement counters only (the
#: durability settings stay PostgreSQL's defaults)
PG_SETTINGS = {"shared_preload_libraries": "pg_stat_statements", "pg_stat_statements.track": "top"}


#: settings that would acknowledge what a crash can lose: not for a benchmark of this
NOT_DURABLE = {"fsync", "synchronous_commit", "full_page_writes", "wal_sync_method"}


def pg_settings(items: Sequence[str]) -> dict[str, str]:
    settings = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value or " " in item:
            raise SystemExit(f"bad --pg-setting {item!r} (NAME=VALUE)")
        if name in NOT_DURABLE:
            raise SystemExit(f"--pg-setting {name}: durability settings stay the defaults")
        settings[name] = value
    return settings


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One scenario's runs → the run of median tx/s, with every run's tx/s beside it."""
    ordered = sorted(runs, key=lambda r: r["tps"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["runs"] = [r["tps"] for r in runs]
    row["errors"] = {}
    for r in runs:
        for code, n in r["errors"].items():
            row["errors"][code] = row["errors"].get(code, 0) + n
    return row


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
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
        pg.start(**PG_SETTINGS, **pg_settings(args.pg_setting))
    runs: list[list[dict[str, Any]]] = [[] for _ in plan]
    try:
        with tempfile.TemporaryDirectory(prefix="gts-replicas-bench-") as tmp:
            for round_ in range(args.rounds):
                for n, (journal, replicas) in enumerate(plan):
                    print(
                        f"-- round {round_ + 1}/{args.rounds}: {journal} x{replicas} ...",
                        file=sys.stderr,
                        flush=True,
                    )
                    work = Path(tmp) / f"r{round_}s{n}"
                    runs[n].append(scenario(work, journal, replicas, args, pg))
                    print(f"   {runs[n][-1]['tps']:,.0f} tx/s", file=sys.stderr, flush=True)
    except BenchError as exc:
        exc.report()
        return 2
    finally:
        if pg is not None:
            pg.destroy()
    rows = [median_row(r) for r in runs]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    client = (
        "lean signed HTTP/1.1 (bench/lean_http.py)"
        if args.client == "lean"
        else "the sidecar's RemoteCoordinator (aiohttp)"
    )
    lines = [
        f"# Replicated coordinator: begin+commit tx/s ({stamp})",
        "",
        f"Machine: {os.cpu_count()} CPUs, {cpu_model()}; every process of a scenario "
        f"(replicas, PostgreSQL, clients) shares them. {args.concurrency} loops "
        f"{'per replica' if args.per_replica else 'in all'}, one client process per replica "
        f"({client}), {args.duration:g}s measured after {args.warmup:g}s of warm-up; "
        f"{args.rounds} interleaved round(s), the median run of each row shown. "
        f"PostgreSQL settings beyond the defaults: "
        f"{', '.join(args.pg_setting) or 'none'} (fsync and synchronous_commit on).",
        "",
        "| journal | replicas | tx/s (median) | runs | p50 ms | p99 ms | CPU ms/tx replicas "
        "| CPU ms/tx PostgreSQL | CPU ms/tx clients | statements/tx | WAL flushes/tx | errors |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        errs = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "none"
        each = " / ".join(f"{t:,.0f}" for t in r["runs"])
        stmts = "—" if r["statements"] is None else f"{r['statements']:.2f}"
        flushes = "—" if r["flushes"] is None else f"{r['flushes']:.2f}"
        lines.append(
            f"| {r['journal']} | {r['replicas']} | {r['tps']:,.0f} | {each} | {r['p50']:.1f} | "
            f"{r['p99']:.1f} | {r['cpu_replicas']:.2f} | {r['cpu_db']:.2f} | "
            f"{r['cpu_clients']:.2f} | {stmts} | {flushes} | {errs} |"
        )
    lines += ["", f"Command: `.venv/bin/python bench/replicas_bench.py {' '.join(argv)}`".rstrip()]
    report = "\n".join(lines) + "\n"
    RESULTS_FILE.parent.mkdir(exist_ok=True)
    RESULTS_FILE.write_text(report)
    print(report)
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
