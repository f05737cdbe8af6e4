"""Unary gRPC calls/s through the sidecar's inbound listener, against the same calls direct and
through nghttpx (nghttp2's C proxy), in one run with one load generator.

Upstream: nghttpd (h2c, C) answering every POST /pkg.Svc/Echo with a gRPC message and
`grpc-status: 0` in trailers, so the upstream costs next to nothing and the figure is the
proxy's. Load: h2load (C) with gRPC framing and headers, `-c` connections of `-m` concurrent
streams. Pinning as in proxy_bench.py: upstream and proxy on CPU 0, h2load on CPU 1. Each
target gets a warm-up, then a timed run; rounds interleave the targets. Latency percentiles
come from h2load's per-request log; CPU per call is the utime + stime of the process under
test (nghttpd direct, nghttpx, the sidecar: each with its children) over the timed run, which
hardly moves when other work shares the machine, unlike calls/s.

    .venv/bin/python bench/grpc_bench.py [--duration 10s] [--rounds 3]

Needs nghttp2-client, nghttp2-proxy and nghttp2-server (Debian); installs them if missing (root).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchkit import (
    REPO_DIR,
    BenchError,
    command_output,
    cpu_model,
    die_with_parent,
    parse_seconds,
    positive_int,
    venv_python,
)

SERVER_CPU, CLIENT_CPU = "0", "1"
XID = "127.0.0.1:8091:123456789"
TARGETS = ("direct", "nghttpx", "sidecar-inbound")
RESULT = REPO_DIR / "bench" / "results" / "grpc_latest.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise BenchError(f"{what} did not listen on {port} within {timeout:g}s")


def ensure_tools() -> dict[str, str]:
    tools = {"h2load": "nghttp2-client", "nghttpx": "nghttp2-proxy", "nghttpd": "nghttp2-server"}
    missing = [pkg for tool, pkg in tools.items() if shutil.which(tool) is None]
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env, check=False)
    found = {tool: shutil.which(tool) for tool in tools}
    absent = [tool for tool, path in found.items() if path is None]
    if absent:
        raise BenchError(f"cannot find {', '.join(absent)} (apt-get install {' '.join(missing)})")
    return {tool: path for tool, path in found.items() if path is not None}


@dataclass(frozen=True)
class Result:
    rps: float
    p50_us: float
    p99_us: float
    ok: int
    failed: int
    #: CPU (user + system) of the process under test per call, µs
    cpu_us: float = 0.0


def parse_h2load(text: str, latencies_us: list[int], cpu_seconds: float) -> Result:
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
    counts = re.search(
        r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", text
    )
    if rps is None or counts is None:
        raise BenchError(f"unexpected h2load output:\n{text}")
    if not latencies_us:
        raise BenchError(f"h2load logged no request:\n{text}")
    ok = int(counts.group(1))
    return Result(
        float(rps.group(1)),
        percentile(latencies_us, 0.50),
        percentile(latencies_us, 0.99),
        ok,
        int(counts.group(2)),
        cpu_seconds * 1e6 / ok if ok else 0.0,
    )


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def read_latencies(log: Path) -> list[int]:
    """The third column of h2load's --log-file: microseconds until the end of the response."""
    out = []
    for line in log.read_text().splitlines():
        cols = line.split("\t")
        if len(cols) >= 3 and cols[2].isdigit():
            out.append(int(cols[2]))
    return out


def group_cpu_seconds(pgid: int) -> float:
    """utime + stime, seconds, of every live process in process group `pgid` (each server is
    started in a session of its own: nghttpx's worker is counted with its master)."""
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        # after the comm: state ppid pgrp ... utime (12th) stime (13th)
        if int(fields[2]) == pgid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


class Rig:
    """The upstream, nghttpx and the sidecar, started once for the whole run."""

    def __init__(self, tools: dict[str, str], work: Path) -> None:
        self.tools = tools
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []
        #: the process under test of each target
        self.servers: dict[str, subprocess.Popen[bytes]] = {}
        taskset = shutil.which("taskset")
        self.server_pin = [taskset, "-c", SERVER_CPU] if taskset else []
        self.client_pin = [taskset, "-c", CLIENT_CPU] if taskset else []
        self.ports = {name: free_port() for name in ("upstream", "nghttpx", "sidecar", *_SC)}

    def spawn(self, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 (kept open for the child)
        proc = subprocess.Popen(
            [*self.server_pin, *argv], stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent, cwd=self.work, start_new_session=True,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        docs = self.work / "docs" / "pkg.Svc"
        docs.mkdir(parents=True)
        (docs / "Echo").write_bytes(b"\x00\x00\x00\x00\x02ok")
        up = self.ports["upstream"]
        proc = self.servers["direct"] = self.spawn(
            [self.tools["nghttpd"], "--no-tls", "-d", str(self.work / "docs"),
             "--trailer=grpc-status: 0", str(up)],
            "nghttpd",
        )  # fmt: skip
        wait_port(up, proc, "nghttpd")
        px = self.ports["nghttpx"]
        proc = self.servers["nghttpx"] = self.spawn(
            [self.tools["nghttpx"], f"--frontend=127.0.0.1,{px};no-tls",
             f"--backend=127.0.0.1,{up};;proto=h2", "--workers=1", "--no-ocsp",
             "--conf=/dev/null", "--errorlog-file=" + str(self.work / "nghttpx.err")],
            "nghttpx",
        )  # fmt: skip
        wait_port(px, proc, "nghttpx")
        config = self.work / "sidecar.yaml"
        config.write_text(
            SIDECAR_YAML.format(
                upstream=up,
                inbound=self.ports["sidecar"],
                **{name: self.ports[name] for name in _SC},
            )  # fmt: skip
        )
        cmd = [str(REPO_DIR / ".venv" / "bin" / "gts-sidecar")]
        if not Path(cmd[0]).exists():
            cmd = [venv_python(), "-m", "sidecar"]
        proc = self.servers["sidecar-inbound"] = self.spawn(
            [*cmd, "run", "--config", str(config)], "sidecar"
        )
        wait_port(self.ports["sidecar"], proc, "gts-sidecar")

    def url(self, target: str) -> str:
        port = {"direct": "upstream", "nghttpx": "nghttpx", "sidecar-inbound": "sidecar"}[target]
        return f"http://127.0.0.1:{self.ports[port]}/pkg.Svc/Echo"

    def load(self, target: str, seconds: float, connections: int, streams: int) -> Result:
        request = self.work / "request.bin"
        request.write_bytes(b"\x00\x00\x00\x00\x02hi")
        log = self.work / "h2load.log"
        log.unlink(missing_ok=True)  # h2load writes into an existing file without truncating it
        argv = [
            *self.client_pin, self.tools["h2load"], f"-D{max(1, round(seconds))}",
            f"-c{connections}", f"-m{streams}", "-t1", "-d", str(request),
            f"--log-file={log}",
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            "-H", f"xid: {XID}", self.url(target),
        ]  # fmt: skip
        pgid = self.servers[target].pid
        before = group_cpu_seconds(pgid)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        cpu = group_cpu_seconds(pgid) - before
        if done.returncode != 0:
            raise BenchError(f"h2load failed on {target}:\n{done.stdout}\n{done.stderr}")
        return parse_h2load(done.stdout, read_latencies(log), cpu)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


_SC = ("outbound", "api", "peer", "admin")
SIDECAR_YAML = """\
listeners:
  inbound: {{bind: "127.0.0.1:{inbound}"}}
  outbound: {{bind: "127.0.0.1:{outbound}"}}
  api: {{bind: "127.0.0.1:{api}"}}
  peer: {{bind: "127.0.0.1:{peer}"}}
  admin: {{bind: "127.0.0.1:{admin}"}}
app:
  url: "http://127.0.0.1:{upstream}"
  protocol: h2c
logging: {{level: warning}}
local_coordinator: {{journal: "memory://"}}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=parse_seconds, default=10.0)
    parser.add_argument("--warmup", type=parse_seconds, default=2.0)
    parser.add_argument("--rounds", type=positive_int, default=1)
    parser.add_argument("--connections", type=positive_int, default=4)
    parser.add_argument("--streams", type=positive_int, default=16, help="h2load -m")
    args = parser.parse_args()
    try:
        tools = ensure_tools()
        with tempfile.TemporaryDirectory(prefix="gts-grpc-bench-") as tmp:
            rig = Rig(tools, Path(tmp))
            try:
                rig.start()
                results: dict[str, list[Result]] = {t: [] for t in TARGETS}
                for _ in range(args.rounds):
                    for target in TARGETS:
                        rig.load(target, args.warmup, args.connections, args.streams)
                        results[target].append(
                            rig.load(target, args.duration, args.connections, args.streams)
                        )
            finally:
                rig.stop()
    except BenchError as exc:
        exc.report()
        return 1
    report = render(results, args, tools)
    RESULT.write_text(report)
    print(report)
    print(f"# written to {RESULT.relative_to(REPO_DIR)}")
    return 0


def render(
    results: dict[str, list[Result]], args: argparse.Namespace, tools: dict[str, str]
) -> str:
    nghttpx = statistics.median(r.rps for r in results["nghttpx"])
    lines = [
        "# gts-sidecar gRPC benchmark",
        "",
        f"Unary gRPC calls (POST /pkg.Svc/Echo, 5-byte messages, an `xid` on each) by h2load: "
        f"{args.connections} connections × {args.streams} streams, {args.duration:g} s per run, "
        f"{args.rounds} round(s) interleaved; upstream nghttpd (h2c) with `grpc-status: 0` "
        "trailers. Upstream and proxy pinned to CPU 0, h2load to CPU 1. p50/p99: medians over "
        "the rounds of each run's percentiles (h2load's per-request log). CPU per call: user + "
        "system CPU of the process under test (nghttpd for direct; nghttpx; the sidecar) over "
        "the timed run, divided by the calls that succeeded.",
        "",
        "| target | calls/s (median, min–max) | × nghttpx | p50 (µs) | p99 (µs) "
        "| CPU per call (µs) | failed |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for target in TARGETS:
        runs = results[target]
        rps = [r.rps for r in runs]
        med = statistics.median(rps)
        lines.append(
            f"| {target} | {med:,.0f} ({min(rps):,.0f}–{max(rps):,.0f}) | {med / nghttpx:.2f}× | "
            f"{statistics.median(r.p50_us for r in runs):,.0f} | "
            f"{statistics.median(r.p99_us for r in runs):,.0f} | "
            f"{statistics.median(r.cpu_us for r in runs):,.1f} | {sum(r.failed for r in runs)} |"
        )
    lines += [
        "",
        "## Machine",
        "",
        f"- CPU: {cpu_model()}; nproc {os.cpu_count()}",
        f"- python: {sys.version.split()[0]}",
        f"- h2load: {command_output([tools['h2load'], '--version'])}",
        f"- nghttpx: {command_output([tools['nghttpx'], '--version'])}",
        f"- load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        "",
        "## Command",
        "",
        "```",
        " ".join(["python bench/grpc_bench.py", *sys.argv[1:]]),
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
