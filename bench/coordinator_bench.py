"""Coordinator throughput benchmark: begin + commit per second through a standalone coordinator.

What it measures: global transactions per second (one signed ``POST .../transaction/start``
followed by one signed ``POST .../transaction/{xid}/commit``, no branches) through a real
``gts-sidecar coordinator`` process with a durable SQLite journal (WAL, ``synchronous=FULL``:
every journal commit is fsync'd before anything is acknowledged), driven over real HTTP by
``sidecar.coordinator.client.RemoteCoordinator`` (HMAC-signed, with Idempotency-Keys, as the
sidecar itself calls a coordinator cluster).

  coordinator   ``python -m sidecar coordinator --config <generated>``, pinned to CPU 0
  clients       ``--clients`` processes (this script with ``--worker``), pinned to CPU 1,
                ``--concurrency`` begin→commit loops in all, spread over the processes

With ``--degraded`` the system under test is a sidecar (``run``) whose cluster refuses
connections, so its local engine coordinates; each transaction is a TM API begin, a branch
registration signed as a peer sidecar signs it (on the peer listener), and a TM API commit
that returns once the branch's confirm callback (answered by the client process) is done:
four fsync'd journal writes and four HTTP exchanges at the sidecar. The client speaks
HTTP/1.1 over lean keep-alive connections (``bench/lean_http.py``, httptools): an aiohttp
client costs about as much CPU per call as the sidecar does, and would saturate first.

Reported: transactions/s, p50/p90/p99/max latency of one begin+commit pair, the coordinator's
CPU use during the measured window, the flush requests the journal's disk completed in the
window (/proc/diskstats: free to observe, device-wide), with ``--count-fsyncs`` the
coordinator's own fsync/fdatasync calls (``strace -f --seccomp-bpf``: the journal's
fsync-backed commits, and transactions per fsync, the group-commit factor; strace slows the
coordinator down, so the headline figure comes from a run without it), and a cross-check of
the clients' count against the coordinator's ``gts_sidecar_transactions_total{status=
"Committed"}``.

Usage (from the repo root)::

    .venv/bin/python bench/coordinator_bench.py [--duration 10s] [--concurrency 64]
                                                [--clients 1] [--warmup 2s]
                                                [--count-fsyncs] [--profile FILE]

The markdown report goes to stdout and to bench/results/coordinator_latest.md. Exit status:
0 when the run was clean, 1 when calls failed, 2 when nothing could be measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchkit import (
    BenchError,
    command_output,
    cpu_model,
    die_with_parent,
    parse_seconds,
    positive_int,
    venv_python,
)

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_FILE = BENCH_DIR / "results" / "coordinator_latest.md"

COORDINATOR_CPU = 0
CLIENT_CPU = 1
START_TIMEOUT = 30.0
#: seconds the worker processes get to import and connect before the warm-up starts
WORKER_STARTUP = 2.0
KEY_ID = "bench-1"
#: the targets on a 2-vCPU machine: a standalone coordinator, a degraded sidecar (issue 17)
TARGET_TPS = 2000
DEGRADED_TARGET_TPS = 3000
STARTED_MSG = "gts-sidecar coordinator started"


# --- command line --------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="begin+commit transactions/s through a standalone gts-sidecar coordinator"
    )
    p.add_argument("--duration", type=parse_seconds, default=10.0, help="measured time (10s)")
    p.add_argument("--warmup", type=parse_seconds, default=2.0, help="unmeasured lead-in (2s)")
    p.add_argument(
        "--concurrency",
        type=positive_int,
        default=64,
        help="begin→commit loops in flight, over all client processes (64)",
    )
    p.add_argument("--clients", type=positive_int, default=1, help="client processes (1)")
    p.add_argument(
        "--no-pin", action="store_true", help="do not pin the coordinator and clients with taskset"
    )
    p.add_argument(
        "--count-fsyncs",
        action="store_true",
        help="run the coordinator under strace to count its fsync/fdatasync calls (costs "
        "throughput: every fsync stops the process for strace)",
    )
    p.add_argument(
        "--profile",
        metavar="FILE",
        help="py-spy record the coordinator during the measured window (speedscope JSON, "
        "or collapsed stacks when FILE ends in .txt)",
    )
    p.add_argument(
        "--dir",
        help="parent directory of the temporary work directory (journal, config, logs); it "
        "must be on a real disk: fsync on tmpfs costs nothing",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--degraded",
        action="store_true",
        help="instead of the standalone coordinator, a sidecar whose cluster is unreachable: "
        "each transaction is begun and committed through its TM API (coordinated by its "
        "local engine) with one TCC branch registered, signed, on its peer listener and "
        "confirmed by a callback to the client",
    )
    # the client processes run this same script
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--api-url", help=argparse.SUPPRESS)
    p.add_argument("--key-file", help=argparse.SUPPRESS)
    p.add_argument("--warm-at", type=float, help=argparse.SUPPRESS)
    p.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    p.add_argument("--end-at", type=float, help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.worker and args.clients > args.concurrency:
        p.error("--clients must not exceed --concurrency")
    return args


# --- the client processes ------------------------------------------------------------------


def worker_main(args: argparse.Namespace) -> int:
    """One client process: `args.concurrency` loops of begin → commit; the JSON result goes
    to `args.result_file`."""
    sys.path.insert(0, str(REPO_DIR))
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency of the sidecar
        uvloop = None
    result = (uvloop.run if uvloop is not None else asyncio.run)(_worker(args))
    Path(args.result_file).write_text(json.dumps(result))
    return 0


async def _worker(args: argparse.Namespace) -> dict[str, Any]:
    from sidecar import config as configmod
    from sidecar.coordinator.client import RemoteCoordinator
    from sidecar.coordinator.signing import KeyRing
    from sidecar.errors import SidecarError
    from sidecar.metrics import Metrics

    cfg = configmod.parse(
        {
            "coordinator": {
                "endpoints": [args.url],
                "signing": {"key_id": KEY_ID, "secret_file": args.key_file},
            }
        },
        env={},
    ).coordinator
    client = RemoteCoordinator(cfg, KeyRing.from_config(cfg.signing), Metrics())
    latencies: list[int] = []  # µs, of the pairs completed in the measured window
    errors: Counter[str] = Counter()
    first_errors: list[str] = []
    completed = 0  # every begin+commit that committed, warm-up and stragglers included
    not_committed: Counter[str] = Counter()

    # --degraded: the app's calls (TM API, unsigned, localhost) and a peer's registration
    # (signed, as RemoteCoordinator signs it) over lean keep-alive connections
    # (bench/lean_http.py: the load generator must not cost as much as what it measures);
    # the branch's confirm callback is answered by this process
    import orjson

    from bench.lean_http import ClientConnection, FixedAnswerServer, build_request, serve_fixed
    from sidecar.coordinator import protocol
    from sidecar.coordinator.client import TxState
    from sidecar.coordinator.signing import sign_headers

    callback_url = ""
    cb_server: Any = None
    if args.degraded:
        answer = FixedAnswerServer.response(200, b'{"status":"PhaseTwo_Committed"}')
        cb_server, cb_port, _ = await serve_fixed(answer)
        callback_url = f"http://127.0.0.1:{cb_port}/cb"
        api_host, api_port = args.api_url.split("://", 1)[1].rsplit(":", 1)
        peer_host, peer_port = args.url.split("://", 1)[1].rsplit(":", 1)
        begin_raw = build_request(
            "POST", "/v1/transactions", f"{api_host}:{api_port}", b'{"name":"bench"}',
            {"Content-Type": "application/json"},
        )  # fmt: skip
        register_path = f"{protocol.API}/branch/register"
        ring = client.ring
    connections: list[ClientConnection] = []

    async def degraded_connections() -> tuple[ClientConnection, ClientConnection]:
        api = await ClientConnection.open(api_host, int(api_port))
        peer = await ClientConnection.open(peer_host, int(peer_port))
        connections.extend((api, peer))
        return api, peer

    async def degraded_pair(api: ClientConnection, peer: ClientConnection) -> TxState:
        status, raw = await api.request(begin_raw)
        if status != 200:
            raise SidecarError(f"begin: HTTP {status} {raw[:200]!r}")
        xid = orjson.loads(raw)["xid"]
        body = (
            b'{"xid":' + orjson.dumps(xid) + b',"branchType":"TCC","resourceId":"bench"'
            + b',"callbackUrl":' + orjson.dumps(callback_url) + b',"applicationData":{}}'
        )  # fmt: skip
        key = os.urandom(16).hex()
        headers = sign_headers(
            ring, "POST", register_path, "", body, now_ms=time.time_ns() // 1_000_000,
            idempotency_key=key, xid=xid,
        )  # fmt: skip
        headers.update({"Content-Type": "application/json", "Idempotency-Key": key, "XID": xid})
        status, raw = await peer.request(
            build_request("POST", register_path, f"{peer_host}:{peer_port}", body, headers)
        )
        if status != 200:
            raise SidecarError(f"register: HTTP {status} {raw[:200]!r}")
        status, raw = await api.request(
            build_request("POST", f"/v1/transactions/{xid}/commit", f"{api_host}:{api_port}")
        )
        if status != 200:
            raise SidecarError(f"commit: HTTP {status} {raw[:200]!r}")
        return TxState(xid, orjson.loads(raw)["status"])

    async def sleep_until(wall: float) -> None:
        delay = wall - time.time()
        if delay > 0:
            await asyncio.sleep(delay)

    async def loop() -> None:
        nonlocal completed
        clock = time.perf_counter
        if args.degraded:
            api, peer = await degraded_connections()
        while True:
            if time.time() >= args.end_at:
                return
            t0 = clock()
            try:
                if args.degraded:
                    done = await degraded_pair(api, peer)
                else:
                    state = await client.begin("bench", 60_000)
                    done = await client.commit(state.xid)
            except SidecarError as exc:
                errors[exc.code] += 1
                if len(first_errors) < 3:
                    first_errors.append(f"{exc.code}: {exc.message}")
                await asyncio.sleep(0.01)
                continue
            elapsed = clock() - t0
            if done.status != "Committed":
                not_committed[done.status] += 1
                continue
            completed += 1
            if args.start_at <= time.time() < args.end_at:  # completed inside the window
                latencies.append(int(elapsed * 1_000_000))

    window_cpu: list[float] = []

    async def sample_cpu() -> None:
        await sleep_until(args.start_at)
        window_cpu.append(time.process_time())
        await sleep_until(args.end_at)
        window_cpu.append(time.process_time())

    try:
        await sleep_until(args.warm_at)
        sampler = asyncio.ensure_future(sample_cpu())
        await asyncio.gather(*(loop() for _ in range(args.concurrency)))
        await sampler
    finally:
        await client.close()
        for conn in connections:
            conn.close()
        if cb_server is not None:
            cb_server.close()
    return {
        "latencies_us": latencies,
        "completed": completed,
        "errors": dict(errors),
        "not_committed": dict(not_committed),
        "first_errors": first_errors,
        "cpu_seconds": window_cpu[1] - window_cpu[0],
    }


# --- processes -----------------------------------------------------------------------------


def pinning(no_pin: bool) -> tuple[list[str], list[str], str]:
    """taskset prefixes for the coordinator and the clients, and what was done."""
    taskset = shutil.which("taskset")
    if no_pin:
        return [], [], "not pinned (--no-pin)"
    if taskset is None:
        return [], [], "not pinned (taskset not found)"
    if not {COORDINATOR_CPU, CLIENT_CPU} <= os.sched_getaffinity(0):
        return [], [], f"not pinned (CPUs {COORDINATOR_CPU} and {CLIENT_CPU} not both usable)"
    return (
        [taskset, "-c", str(COORDINATOR_CPU)],
        [taskset, "-c", str(CLIENT_CPU)],
        f"coordinator (all its threads) on CPU {COORDINATOR_CPU}, clients on CPU {CLIENT_CPU}",
    )


def strace_usable() -> str | None:
    """The strace binary when it can trace a child with seccomp-bpf here, else None."""
    strace = shutil.which("strace")
    if strace is None:
        return None
    probe = subprocess.run(
        [strace, "-f", "--seccomp-bpf", "-qq", "-e", "trace=fdatasync", "-o", os.devnull, "true"],
        capture_output=True,
    )
    return strace if probe.returncode == 0 else None


@dataclass
class Coordinator:
    popen: subprocess.Popen[bytes]
    ports: dict[str, int]
    pid: int  # the Python process (strace, when used, is popen's process)
    log_tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    reader: threading.Thread | None = None

    def stop(self, grace: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        if self.reader is not None:
            self.reader.join(5)
        return self.popen.returncode


def write_config(work: Path, degraded: bool = False) -> tuple[Path, Path]:
    key_file = work / "signing.key"
    key_file.write_text(os.urandom(32).hex() + "\n")
    binds = {n: {"bind": "127.0.0.1:0"} for n in ("inbound", "outbound", "api", "peer", "admin")}
    coordinator: dict[str, Any] = {"signing": {"key_id": KEY_ID, "secret_file": str(key_file)}}
    if degraded:
        # a cluster that refuses connections at once; after the first failure the breaker
        # stays open for the whole run, so every begin is coordinated locally
        coordinator["endpoints"] = ["http://127.0.0.1:1"]
        coordinator["breaker"] = {"failures": 1, "reset": "1h"}
    config = {
        "listeners": binds,
        "logging": {"level": "info", "format": "json"},
        "drain_timeout": "5s",
        "coordinator": coordinator,
        "local_coordinator": {"journal": f"sqlite:///{work.resolve()}/journal.db"},
    }
    path = work / "coordinator.yaml"
    # JSON is YAML: no dependency on PyYAML in this process
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path, key_file


def start_coordinator(
    config: Path,
    pin: list[str],
    strace_pin: list[str],
    strace: str | None,
    fsync_log: Path,
    degraded: bool = False,
) -> Coordinator:
    """The coordinator on `pin`; under strace (itself on `strace_pin`) when given. With
    `degraded`, a sidecar (`run`) whose local engine is the coordinator."""
    command = "run" if degraded else "coordinator"
    started_msg = "gts-sidecar started" if degraded else STARTED_MSG
    argv = [*pin, venv_python(), "-m", "sidecar", command, "--config", str(config)]
    if strace is not None:
        trace = [strace, "-f", "--seccomp-bpf", "-qq", "-ttt", "-T"]
        trace += ["-e", "trace=fsync,fdatasync"]
        argv = [*strace_pin, *trace, "-o", str(fsync_log), *argv]
    popen = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=REPO_DIR,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    assert popen.stderr is not None
    started: dict[str, Any] = {}
    tail: deque[str] = deque(maxlen=40)
    ready = threading.Event()

    def read() -> None:
        assert popen.stderr is not None
        for raw in popen.stderr:
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
            if not ready.is_set():
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    if isinstance(rec, dict) and rec.get("msg") == started_msg:
                        started.update(rec)
                        ready.set()
        ready.set()  # the process ended

    reader = threading.Thread(target=read, name="coordinator-stderr", daemon=True)
    reader.start()
    ready.wait(START_TIMEOUT)
    if not started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
        why = "exited" if popen.returncode is not None else "did not start in time"
        raise BenchError(
            f"the coordinator {why} (command: {shlex.join(popen.args)})",  # type: ignore[arg-type]
            "\n".join(tail),
        )
    pid = python_pid(popen.pid) if strace is not None else popen.pid
    coord = Coordinator(popen, {k: int(v) for k, v in started["ports"].items()}, pid, tail)
    coord.reader = reader
    return coord


def python_pid(root: int) -> int:
    """The coordinator's Python process under strace (and taskset): the deepest descendant."""
    pid = root
    for _ in range(5):
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            break
        if not children:
            break
        pid = int(children[0])
    return pid


def cpu_seconds(pid: int) -> dict[int, tuple[float, float]] | None:
    """(utime, stime) of each thread of a process, in seconds, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[float, float]] = {}
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return None
    for tid in tids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            out[tid] = (int(fields[11]) / tick, int(fields[12]) / tick)
    return out


@dataclass
class CoordinatorCpu:
    """CPU seconds of the system under test between two samples."""

    main: float  # the main thread, i.e. the event loop
    rest: float  # every other thread, i.e. essentially the journal's writer thread
    user: float  # all threads, in user space
    system: float  # all threads, in the kernel (socket calls, fsync, thread wake-ups)


def thread_cpu(
    pid: int, before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]]
) -> CoordinatorCpu:
    out = CoordinatorCpu(0.0, 0.0, 0.0, 0.0)
    for tid, (user, system) in after.items():
        user0, system0 = before.get(tid, (0.0, 0.0))
        spent = (user - user0) + (system - system0)
        if tid == pid:
            out.main += spent
        else:
            out.rest += spent
        out.user += user - user0
        out.system += system - system0
    return out


def committed_metric(admin_port: int) -> int | None:
    """gts_sidecar_transactions_total{status="Committed"} from the coordinator's /metrics."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith("gts_sidecar_transactions_total{") and 'status="Committed"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


@dataclass
class Fsyncs:
    window: int  # fsync/fdatasync calls that started in the measured window
    total: int  # over the coordinator's life
    durations_ms: list[float]  # of those in the window, from strace -T


def count_fsyncs(log: Path, start: float, end: float) -> Fsyncs | None:
    """The coordinator's fsync and fdatasync calls from strace's `-ttt -T` output."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    out = Fsyncs(0, 0, [])
    for line in lines:
        parts = line.split(None, 2)  # pid, timestamp, call
        if len(parts) < 3 or not parts[2].startswith(("fsync(", "fdatasync(")):
            continue
        out.total += 1
        with contextlib.suppress(ValueError):
            if start <= float(parts[1]) < end:
                out.window += 1
                took = re.search(r"<(\d+\.\d+)>\s*$", parts[2])
                if took:
                    out.durations_ms.append(float(took.group(1)) * 1000)
    return out


def cpu_times() -> dict[str, list[int]]:
    """/proc/stat's per-CPU jiffies (user nice system idle iowait irq softirq steal …)."""
    out: dict[str, list[int]] = {}
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *values = line.split()
                out[name] = [int(v) for v in values]
    return out


def cpu_usage(before: dict[str, list[int]], after: dict[str, list[int]]) -> tuple[str, float]:
    """How each CPU spent the window (busy, of which softirq; steal, i.e. the hypervisor;
    idle), and the busy CPU-seconds of every process together."""
    parts = []
    busy_all = 0
    for name in sorted(after):
        if name not in before:
            continue
        d = [a - b for a, b in zip(after[name], before[name], strict=False)]
        total = sum(d[:8]) or 1
        idle = d[3] + d[4]
        steal = d[7] if len(d) > 7 else 0
        busy = total - idle - steal
        busy_all += busy
        parts.append(
            f"{name}: {busy / total:.0%} busy ({d[6] / total:.0%} softirq), "
            f"{steal / total:.0%} steal, {idle / total:.0%} idle"
        )
    return "; ".join(parts) or "unknown", busy_all / os.sysconf("SC_CLK_TCK")


def busy_share(seconds: float = 1.0) -> float | None:
    """Share of all CPUs' time spent busy over `seconds` (to warn when others are running)."""
    before = cpu_times()
    time.sleep(seconds)
    after = cpu_times()
    if not before or not after:
        return None
    total = sum(sum(v[:8]) for v in after.values()) - sum(sum(v[:8]) for v in before.values())
    idle = sum(v[3] + v[4] for v in after.values()) - sum(v[3] + v[4] for v in before.values())
    return 1.0 - idle / total if total > 0 else None


def start_profiler(pid: int, seconds: float, out: str) -> subprocess.Popen[bytes] | None:
    pyspy = REPO_DIR / ".venv" / "bin" / "py-spy"
    exe = str(pyspy) if pyspy.exists() else shutil.which("py-spy")
    if exe is None:
        print("!! --profile: py-spy not found", file=sys.stderr)
        return None
    fmt = "raw" if out.endswith(".txt") else "speedscope"
    argv = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
    argv += ["--rate", "250", "--threads", "--nonblocking", "--format", fmt, "--output", out]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


# --- the report ----------------------------------------------------------------------------


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return float(sorted_values[index])


def mount_of(path: Path) -> tuple[str, str, str]:
    """(mount point, device, filesystem type) holding `path`, from /proc/mounts."""
    best = ("", "?", "?")
    with contextlib.suppress(OSError):
        target = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best[0]):
                best = (mnt, dev, fstype)
    return best


def filesystem_of(path: Path) -> str:
    mnt, dev, fstype = mount_of(path)
    return f"{fstype} ({dev} on {mnt})"


def device_flushes(path: Path) -> int | None:
    """Flush requests completed by the block device holding `path` (/proc/diskstats field
    "flush requests completed", Linux 5.5+): what the journal's fsyncs cost at the disk,
    counted at no cost to the coordinator. Device-wide: other writers on the disk count too."""
    _, dev, _ = mount_of(path)
    name = os.path.basename(os.path.realpath(dev)) if dev.startswith("/dev/") else None
    if not name:
        return None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/diskstats").read_text().splitlines():
            fields = line.split()
            if fields[2] == name and len(fields) >= 19:
                return int(fields[17])
    return None


def machine_facts(work: Path, pin_text: str, python: str) -> list[tuple[str, str]]:
    commit = command_output(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"])
    return [
        ("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")),
        ("nproc", f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable)"),
        ("CPU", cpu_model()),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("python", command_output([python, "-VV"])),
        ("journal filesystem", filesystem_of(work)),
        ("pinning", pin_text),
        ("repo commit", commit + " (plus any uncommitted changes)"),
    ]


# --- the run -------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    coord_pin, client_pin, pin_text = pinning(args.no_pin)
    strace = strace_usable() if args.count_fsyncs else None
    if strace is None and args.count_fsyncs:
        print("!! strace (with --seccomp-bpf) not usable: fsyncs are not counted", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="gts-coordinator-bench-", dir=args.dir))
    fs = filesystem_of(work)
    if fs.startswith("tmpfs") or fs.startswith("ramfs"):
        print(f"!! {work} is on {fs}: fsync costs nothing there; use --dir", file=sys.stderr)
    python = venv_python()
    busy_before = busy_share()
    if busy_before is not None and busy_before > 0.10:
        print(
            f"!! the CPUs are {busy_before:.0%} busy before the start: other work on this "
            "machine will skew the figures",
            file=sys.stderr,
        )
    coord: Coordinator | None = None
    workers: list[subprocess.Popen[bytes]] = []
    try:
        config, key_file = write_config(work, args.degraded)
        fsync_log = work / "fsync.strace"
        print("starting the coordinator …", file=sys.stderr)
        coord = start_coordinator(config, coord_pin, client_pin, strace, fsync_log, args.degraded)
        url = f"http://127.0.0.1:{coord.ports['peer']}"
        committed_before = committed_metric(coord.ports["admin"])

        now = time.time()
        warm_at = now + WORKER_STARTUP
        start_at = warm_at + args.warmup
        end_at = start_at + args.duration
        shares = [args.concurrency // args.clients] * args.clients
        for i in range(args.concurrency % args.clients):
            shares[i] += 1
        for i, share in enumerate(shares):
            argv = [python, str(Path(__file__).resolve()), "--worker", "--url", url]
            if args.degraded:
                argv += ["--degraded", "--api-url", f"http://127.0.0.1:{coord.ports['api']}"]
            argv += ["--key-file", str(key_file), "--concurrency", str(share)]
            argv += ["--warm-at", repr(warm_at), "--start-at", repr(start_at)]
            argv += ["--end-at", repr(end_at), "--result-file", str(work / f"client-{i}.json")]
            with open(work / f"client-{i}.stderr.log", "wb") as err:
                workers.append(
                    subprocess.Popen(
                        [*client_pin, *argv],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                        cwd=REPO_DIR,
                        preexec_fn=die_with_parent,
                    )
                )
        print(
            f"{args.clients} client process(es), {args.concurrency} loops; warm-up "
            f"{args.warmup:g}s, measuring {args.duration:g}s …",
            file=sys.stderr,
        )
        time.sleep(max(0.0, start_at - time.time()))
        cpu_start = cpu_seconds(coord.pid)
        flushes_start = device_flushes(work)
        cpus_start = cpu_times()
        profiler = start_profiler(coord.pid, args.duration, args.profile) if args.profile else None
        time.sleep(max(0.0, end_at - time.time()))
        cpu_end = cpu_seconds(coord.pid)
        flushes_end = device_flushes(work)
        cpus, busy_seconds = cpu_usage(cpus_start, cpu_times())

        results: list[dict[str, Any]] = []
        failures: list[str] = []
        for i, proc in enumerate(workers):
            proc.wait(timeout=args.duration + 120)
            if proc.returncode != 0:
                err = (work / f"client-{i}.stderr.log").read_text(errors="replace")
                failures.append(f"client {i} exited {proc.returncode}: {err[-2000:]}")
                continue
            results.append(json.loads((work / f"client-{i}.json").read_text()))
        if profiler is not None:
            _, perr = profiler.communicate(timeout=60)
            if profiler.returncode != 0:
                print(f"!! py-spy failed: {perr.decode()[-1000:]}", file=sys.stderr)
            else:
                print(f"profile written to {args.profile}", file=sys.stderr)
        committed_after = committed_metric(coord.ports["admin"])
        rc = coord.stop()
        fsyncs = count_fsyncs(fsync_log, start_at, end_at) if strace else None
        if failures:
            raise BenchError("a client process failed", "\n".join(failures))
        report = render(
            args,
            results,
            machine_facts(work, pin_text, python),
            coord_cpu=None
            if cpu_start is None or cpu_end is None
            else thread_cpu(coord.pid, cpu_start, cpu_end),
            committed=(committed_before, committed_after),
            fsyncs=fsyncs,
            flushes=None
            if flushes_start is None or flushes_end is None
            else flushes_end - flushes_start,
            coordinator_rc=rc,
            cpus=cpus,
            busy_seconds=busy_seconds,
            busy_before=busy_before,
        )
        print(report)
        RESULTS_FILE.parent.mkdir(exist_ok=True)
        RESULTS_FILE.write_text(report + "\n")
        print(f"report written to {RESULTS_FILE}", file=sys.stderr)
        clean = all(not r["errors"] and not r["not_committed"] for r in results)
        return 0 if clean else 1
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if coord is not None:
            coord.stop()
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def render(
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    facts: list[tuple[str, str]],
    *,
    coord_cpu: CoordinatorCpu | None,
    committed: tuple[int | None, int | None],
    fsyncs: Fsyncs | None,
    flushes: int | None,
    coordinator_rc: int | None,
    cpus: str,
    busy_seconds: float,
    busy_before: float | None,
) -> str:
    lat = sorted(v for r in results for v in r["latencies_us"])
    count = len(lat)
    tps = count / args.duration
    errors: Counter[str] = Counter()
    not_committed: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
        not_committed.update(r["not_committed"])
    completed = sum(r["completed"] for r in results)
    client_cpu = sum(r["cpu_seconds"] for r in results)
    ms = [percentile(lat, q) / 1000 for q in (0.5, 0.9, 0.99, 1.0)]
    target = DEGRADED_TARGET_TPS if args.degraded else TARGET_TPS
    verdict = "meets" if tps >= target else "is BELOW"
    if args.degraded:
        title = (
            "# Degraded-mode benchmark: begin + register + commit through a sidecar whose "
            "cluster is unreachable (its local engine coordinates)"
        )
        unit = (
            "Latency is one transaction as the client sees it: a TM API begin, a signed branch "
            "registration on the peer listener, a TM API commit that returns once the branch's "
            "confirm callback was answered; four journal writes, each fsync'd before its "
            "acknowledgement."
        )
    else:
        title = "# Coordinator benchmark: begin + commit through a standalone coordinator"
        unit = (
            "Latency is one begin+commit pair as the client sees it (two signed HTTP calls, "
            "each acknowledged only after its journal write is fsync'd)."
        )
    lines = [
        title,
        "",
        f"{count} transactions committed in the measured {args.duration:g} s: "
        f"**{tps:,.0f} transactions/s**, which {verdict} the target of {target:,}/s.",
        "",
        "| tx/s | p50 (ms) | p90 (ms) | p99 (ms) | max (ms) | concurrency | client processes |",
        "|--:|--:|--:|--:|--:|--:|--:|",
        f"| {tps:,.0f} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[2]:.2f} | {ms[3]:.2f} "
        f"| {args.concurrency} | {args.clients} |",
        "",
        unit,
        "",
        "| measured window | |",
        "|---|---|",
    ]
    coord_total = None
    if coord_cpu is not None:
        main, rest = coord_cpu.main, coord_cpu.rest
        coord_total = main + rest
        per_tx = 1e6 / max(count, 1)
        lines.append(
            f"| coordinator CPU | {coord_total:.2f} s of {args.duration:g} s "
            f"({coord_total / args.duration:.0%} of one CPU), "
            f"{coord_total * per_tx:.0f} µs per transaction: event-loop thread {main:.2f} s "
            f"({main * per_tx:.0f} µs/tx), other threads (journal writer) {rest:.2f} s "
            f"({rest * per_tx:.0f} µs/tx); user {coord_cpu.user * per_tx:.0f} + "
            f"system {coord_cpu.system * per_tx:.0f} µs/tx |"
        )
    lines.append(
        f"| client CPU (all client processes) | {client_cpu:.2f} s "
        f"({client_cpu / args.duration:.0%} of one CPU) |"
    )
    lines.append(f"| CPUs (/proc/stat: every process) | {cpus} |")
    if coord_total is not None:
        others = busy_seconds - coord_total - client_cpu
        lines.append(
            f"| other processes (strace, this script, the kernel's own work, anything else) "
            f"| {max(0.0, others):.2f} CPU-s |"
        )
    if busy_before is not None:
        lines.append(f"| CPUs busy in the second before the start | {busy_before:.0%} |")
    if fsyncs is not None:
        window = fsyncs.window
        per = f"{count / window:.1f} transactions ({2 * count / window:.1f} journal writes)"
        took = sorted(fsyncs.durations_ms)
        p50, p99 = (took[len(took) // 2], took[int(len(took) * 0.99)]) if took else (0.0, 0.0)
        lines.append(
            f"| journal fsyncs (strace: fsync + fdatasync) | {window} in the window, "
            f"{window / args.duration:,.0f}/s; {per if window else '-'} per fsync "
            f"(group commit); each took p50 {p50:.2f} ms, p99 {p99:.2f} ms; "
            f"{fsyncs.total} over the coordinator's life |"
        )
    else:
        lines.append("| journal fsyncs | not counted (run with --count-fsyncs) |")
    if flushes is not None:
        lines.append(
            f"| disk flush requests (/proc/diskstats, whole device; see bench/README.md) "
            f"| {flushes} in the window ({flushes / args.duration:,.1f}/s) |"
        )
    before, after = committed
    if before is not None and after is not None:
        match = "matches" if after - before == completed else "DOES NOT MATCH"
        lines.append(
            f"| cross-check | coordinator's transactions_total{{status=Committed}} grew by "
            f"{after - before}; clients saw {completed} commits (warm-up included): {match} |"
        )
    if errors or not_committed:
        lines.append(f"| errors | {dict(errors)} not committed: {dict(not_committed)} |")
        firsts = [e for r in results for e in r["first_errors"]][:3]
        lines.extend(f"| first error | {e} |" for e in firsts)
    if coordinator_rc not in (0, None):
        lines.append(f"| coordinator exit status | {coordinator_rc} |")
    lines += ["", "| machine | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in facts]
    cmd = shlex.join(
        [".venv/bin/python", "bench/coordinator_bench.py"]
        + ["--duration", f"{args.duration:g}s", "--warmup", f"{args.warmup:g}s"]
        + ["--concurrency", str(args.concurrency), "--clients", str(args.clients)]
        + (["--degraded"] if args.degraded else [])
        + (["--no-pin"] if args.no_pin else [])
        + (["--count-fsyncs"] if args.count_fsyncs else [])
    )
    lines += ["", f"Command: `{cmd}`"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return worker_main(args)
    try:
        return run(args)
    except BenchError as err:
        err.report()
        return 2
    except KeyboardInterrupt:
        return 2


if __name__ == "__main__":
    sys.exit(main())
