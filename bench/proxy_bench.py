"""Proxy overhead benchmark for gts-sidecar, on loopback, in one run.

What it is for: to put a number on what the sidecar's data plane costs, next to a
reference proxy everyone knows. The targets serve the SAME tiny upstream and are hit with
the SAME wrk settings (h2load for the HTTP/2 ones), every request carrying a valid XID header:

  direct            the upstream itself (nginx, 1 worker, ``return 200 "ok\\n"``)
  nginx-proxy       nginx, 1 worker, reverse proxy with upstream keep-alive
  sidecar-inbound   ``gts-sidecar run``: inbound listener -> ``app.url`` = the upstream
  sidecar-outbound  the same sidecar: ``/up/`` on the outbound listener -> upstream ``up``
  sidecar-inbound-compiled, sidecar-outbound-compiled
                    the same two, from a second sidecar whose request path is compiled by
                    mypyc (``GTS_SIDECAR_COMPILE=1 setup.py build_ext --inplace`` in a copy of
                    the tree, made by the benchmark: ~1 min, needs a C compiler); it must
                    report itself compiled (``--version``) or the two rows fail
  nginx-tls         nginx, 1 worker, terminating TLS (ECDSA P-256, TLS 1.3) and proxying
  sidecar-inbound-tls  a second sidecar whose inbound listener terminates TLS with the SAME
                    certificate and key (``listeners.inbound.tls``)
  nghttpx-h2c       nghttpx (nghttp2's C proxy), 1 worker, an h2c frontend (HTTP/2 with prior
                    knowledge) proxying to the upstream over HTTP/1.1
  sidecar-inbound-h2c, sidecar-inbound-h2c-compiled
                    the inbound listeners of the pure and compiled sidecars above, spoken to in
                    HTTP/2 with prior knowledge (the app is the same upstream over HTTP/1.1)

The TLS pair is measured over keep-alive connections (wrk opens each once), so it shows the
cost of encrypting and decrypting the traffic, not of handshakes; each is compared with its
own nginx (the "ratio" column: plain targets against nginx-proxy, TLS ones against nginx-tls).

The HTTP/2 trio is loaded by h2load (``-t1 -c4 -m16`` by default: 64 streams in flight, about
wrk's 50 requests in flight, on few multiplexed connections as a gRPC channel keeps them; the
load bench/grpc_bench.py uses), pinned like wrk, for the same durations, in the throughput set
only; p50/p99 come from h2load's per-request log, and the ratios are against nghttpx-h2c.
They need h2load, nghttp and nghttpx (Debian's nghttp2-client and nghttp2-proxy, installed
like nginx and wrk when missing); when those cannot be had, the default target list leaves
the HTTP/2 rows out and the report says so (named in --targets, they fail).

Two sets of wrk runs: ``-t1 -c<connections>`` (throughput: requests/s, p50, p99) and
``-t1 -c1`` (latency: the p50 each hop adds over ``direct``). wrk runs on CPU 1; the
upstream and the proxies share CPU 0 ("proxy and upstream on one core"). Beside requests/s,
each target's own CPU time per request (user and system, of its process group) and its RSS
(idle after start, and the peak under load) are reported.

``--rounds N`` interleaves: the servers start once, then each round runs every target once,
in the same order (both sets), so slow drifts of a shared machine fall on every target
alike; the report gives each figure's median with its min–max over the rounds, and each
ratio is taken within a round (a target against its nginx of the same round).

Usage (from the repo root)::

    .venv/bin/python bench/proxy_bench.py [--duration 10s] [--connections 50] [--quick]
                                          [--rounds 3] [--targets direct,nginx-proxy]
                                          [--h2-connections 4] [--h2-streams 16]

The markdown report goes to stdout and to bench/results/latest.md. Exit status: 0 when every
requested target was measured cleanly, 1 when one failed (e.g. the sidecar did not start) or
answered errors, 2 when nothing could be measured (bad usage, missing tools, the upstream
did not start). Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import http.client
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchkit import BenchError, command_output, cpu_model, die_with_parent, positive_int
from grpc_bench import percentile, read_latencies

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_FILE = BENCH_DIR / "results" / "latest.md"

XID_HEADER = ("XID", "127.0.0.1:8091:123456789")
UPSTREAM_BODY = b"ok\n"
ALL_TARGETS = (
    "direct",
    "nginx-proxy",
    "sidecar-inbound",
    "sidecar-outbound",
    "sidecar-inbound-compiled",
    "sidecar-outbound-compiled",
    "nginx-tls",
    "sidecar-inbound-tls",
    "nghttpx-h2c",
    "sidecar-inbound-h2c",
    "sidecar-inbound-h2c-compiled",
)
SIDECAR_TARGETS = ("sidecar-inbound", "sidecar-outbound", "sidecar-inbound-h2c")
COMPILED_TARGETS = (
    "sidecar-inbound-compiled",
    "sidecar-outbound-compiled",
    "sidecar-inbound-h2c-compiled",
)
#: loaded with h2load (HTTP/2 with prior knowledge) instead of wrk
H2_TARGETS = ("nghttpx-h2c", "sidecar-inbound-h2c", "sidecar-inbound-h2c-compiled")
#: the reference each target's ratio is taken against (nginx-proxy when not named here)
REFERENCE = {
    "nginx-tls": "nginx-tls",
    "sidecar-inbound-tls": "nginx-tls",
    **{name: "nghttpx-h2c" for name in H2_TARGETS},
}
TOOL_PACKAGES = {"nginx": "nginx-light", "wrk": "wrk"}
#: the HTTP/2 rows' tools: optional, the other rows are measured without them
H2_TOOL_PACKAGES = {
    "h2load": "nghttp2-client",
    "nghttp": "nghttp2-client",
    "nghttpx": "nghttp2-proxy",
}
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"

SERVER_CPU = 0  # upstream and every proxy under test
CLIENT_CPU = 1  # wrk
START_TIMEOUT = 30.0  # seconds a server gets to open its port / become ready
BUSY_SHARE = 0.10  # CPU time used by others, before we start, above which we warn
IDLE_SETTLE_S = 3.0  # after start and one request, before the idle RSS is read
RSS_SAMPLE_S = 0.25  # RSS sampling period during a measured run (peak under load)


# --- command line --------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    duration_s: int
    warmup_s: int
    connections: int
    targets: tuple[str, ...]
    sidecar_cmd: list[str]
    rounds: int = 1
    output: Path = RESULTS_FILE
    #: h2load's -c and -m for the HTTP/2 rows
    h2_connections: int = 4
    h2_streams: int = 16
    #: --targets was given: a target that cannot be measured is a failure, not left out
    targets_explicit: bool = False


def parse_seconds(text: str) -> int:
    """'10s', '2m', '1h' or a bare number of seconds -> whole seconds (>= 1)."""
    m = re.fullmatch(r"\s*(\d+)\s*([smh]?)\s*", text)
    if not m or int(m.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"not a duration like 10s, 2m or 30: {text!r}")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def parse_targets(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [t for t in names if t not in ALL_TARGETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown target(s) {', '.join(unknown) or '(none)'}; choose from "
            + ",".join(ALL_TARGETS)
        )
    return names


def parse_args(argv: Sequence[str]) -> Options:
    p = argparse.ArgumentParser(
        description="requests/s and latency of direct vs nginx vs gts-sidecar, with wrk",
    )
    p.add_argument("--duration", type=parse_seconds, default=10, help="per wrk run (10s)")
    p.add_argument("--warmup", type=parse_seconds, default=2, help="per target, unmeasured (2s)")
    p.add_argument("--connections", type=int, default=50, help="throughput set's -c (50)")
    p.add_argument(
        "--quick", action="store_true", help="3 s runs, overriding --duration: a smoke test"
    )
    p.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="interleaved rounds, each running every target once in the same order; the "
        "report gives median and min-max per target (1)",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=RESULTS_FILE,
        metavar="FILE",
        help="where the markdown report is written (bench/results/latest.md)",
    )
    p.add_argument(
        "--sidecar-cmd",
        type=shlex.split,
        default=None,
        help="command that takes `run --config FILE` (default: .venv/bin/gts-sidecar, "
        "else python -m sidecar)",
    )
    p.add_argument(
        "--targets",
        type=parse_targets,
        default=None,
        help="comma list, subset of " + ",".join(ALL_TARGETS) + " (all; the HTTP/2 ones only "
        "when h2load and nghttpx are there or can be installed)",
    )
    # 4 x 16 = 64 streams in flight, about the throughput set's 50 requests in flight, on a
    # few multiplexed connections as an HTTP/2 client (a gRPC channel) keeps them; the same
    # load as bench/grpc_bench.py, so the rows read beside its figures
    p.add_argument(
        "--h2-connections", type=positive_int, default=4, help="HTTP/2 rows' h2load -c (4)"
    )
    p.add_argument(
        "--h2-streams",
        type=positive_int,
        default=16,
        help="HTTP/2 rows' h2load -m, concurrent streams per connection (16)",
    )
    a = p.parse_args(argv)
    if a.connections < 1:
        p.error("--connections must be at least 1")
    return Options(
        duration_s=3 if a.quick else a.duration,
        warmup_s=a.warmup,
        connections=a.connections,
        # report rows in the canonical order whatever order they were asked in
        targets=tuple(t for t in ALL_TARGETS if t in (a.targets or ALL_TARGETS)),
        sidecar_cmd=a.sidecar_cmd or default_sidecar_command(),
        rounds=a.rounds,
        output=a.output,
        h2_connections=a.h2_connections,
        h2_streams=a.h2_streams,
        targets_explicit=a.targets is not None,
    )


# --- tools ---------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    """Like `which`, but also looks in the sbin directories (nginx lives in /usr/sbin)."""
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + SBIN_PATH)


def ensure_packages(tool_packages: dict[str, str]) -> dict[str, str]:
    """Paths of the tools (keys), installing the Debian packages (values) of those missing
    first; a BenchError says which cannot be had."""
    missing = sorted({pkg for tool, pkg in tool_packages.items() if find_tool(tool) is None})
    if missing:
        install_packages(missing)
    paths = {tool: find_tool(tool) for tool in tool_packages}
    absent = [tool for tool, path in paths.items() if path is None]
    if absent:
        raise BenchError(f"still not found after installing: {', '.join(absent)}")
    return {tool: str(path) for tool, path in paths.items()}


def ensure_tools() -> dict[str, str]:
    """nginx and wrk."""
    return ensure_packages(TOOL_PACKAGES)


def ensure_h2_tools() -> dict[str, str]:
    """h2load, nghttp and nghttpx (nghttp2-client, nghttp2-proxy)."""
    return ensure_packages(H2_TOOL_PACKAGES)


def install_packages(packages: list[str]) -> None:
    """apt-get install, non-interactive; apt-get update only if apt does not know them yet."""
    hint = "apt-get install -y " + " ".join(packages)
    if shutil.which("apt-get") is None:
        raise BenchError(f"missing {', '.join(packages)} and no apt-get; install them: {hint}")
    if os.geteuid() != 0:
        raise BenchError(f"missing {', '.join(packages)}; as root run: {hint}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"# installing {' '.join(packages)} ...", file=sys.stderr)
    known = subprocess.run(["apt-cache", "show", *packages], env=env, capture_output=True)
    if known.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=False)
    done = subprocess.run(["apt-get", "install", "-y", *packages], env=env)
    if done.returncode != 0:
        raise BenchError(f"`{hint}` failed (exit {done.returncode})")


def cpu_pinning() -> tuple[list[str], list[str], str]:
    """taskset prefixes for the servers and for wrk, and a sentence saying what was done."""
    taskset = shutil.which("taskset")
    cpus = os.sched_getaffinity(0)
    if taskset is None:
        return [], [], "not pinned (taskset not found)"
    if not {SERVER_CPU, CLIENT_CPU} <= cpus:
        return [], [], f"not pinned (CPUs {SERVER_CPU} and {CLIENT_CPU} not both available)"
    return (
        [taskset, "-c", str(SERVER_CPU)],
        [taskset, "-c", str(CLIENT_CPU)],
        f"wrk on CPU {CLIENT_CPU}; upstream and proxy under test together on CPU {SERVER_CPU}",
    )


def default_sidecar_command() -> list[str]:
    """The console script when the package is installed, else `python -m sidecar`."""
    script = REPO_DIR / ".venv" / "bin" / "gts-sidecar"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "sidecar"]


# --- ports and readiness ---------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (all held open until all are chosen)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def wait_until(
    ready: Callable[[], bool], server: Server, what: str, timeout: float = START_TIMEOUT
) -> None:
    """Poll `ready()` until it is true. If the server exits first or the time runs out, stop
    it and raise with the tail of its stderr."""
    deadline = time.monotonic() + timeout
    while not ready():
        if server.popen.poll() is not None:
            problem = f"{server.name} exited with status {server.popen.returncode}"
        elif time.monotonic() > deadline:
            problem = f"{server.name}: {what} not ready after {timeout:.0f}s"
        else:
            time.sleep(0.02)
            continue
        server.stop()
        raise BenchError(
            f"{problem} (command: {shlex.join(server.popen.args)})",
            f"-- last lines of {server.name}'s stderr:\n{server.stderr_tail() or '(empty)'}",
        )


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(
    port: int, path: str = "/", timeout: float = 2.0, tls: bool = False
) -> tuple[int, bytes]:
    """One GET with the bench's XID header; (status, body). With `tls`, over TLS without
    verification (the certificate is the bench's own, made for this run)."""
    conn: http.client.HTTPConnection
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=dict([XID_HEADER]))
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def http_ok(port: int, path: str) -> bool:
    try:
        return http_get(port, path)[0] == 200
    except OSError:
        return False


# --- server processes ----------------------------------------------------------------------


@dataclass
class Server:
    """A process we started, in its own session, with its output in log files."""

    name: str
    popen: subprocess.Popen[bytes]
    stderr_path: Path

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM its process group (nginx master + workers), SIGKILL after `grace`."""
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        with contextlib.suppress(ProcessLookupError):  # stray workers of a dead master
            os.killpg(self.popen.pid, signal.SIGKILL)


class Servers:
    """Starts server processes and guarantees they are all stopped on exit."""

    def __init__(self, workdir: Path, pin: list[str]) -> None:
        self.workdir = workdir
        self.pin = pin
        self.started: list[Server] = []

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path = REPO_DIR
    ) -> Server:
        err_path = self.workdir / f"{name}.stderr.log"
        with open(self.workdir / f"{name}.stdout.log", "wb") as out, open(err_path, "wb") as err:
            popen = subprocess.Popen(
                [*self.pin, *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=cwd,
                env=env,
                start_new_session=True,  # Ctrl-C reaches us; we stop them in order
                preexec_fn=die_with_parent,
            )
        server = Server(name, popen, err_path)
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        for server in reversed(self.started):
            server.stop()
        self.started.clear()


# --- nginx ---------------------------------------------------------------------------------

NGINX_MAIN = """\
{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type text/plain;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{http}
}}
"""

NGINX_UPSTREAM_HTTP = """\
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok\\n"; }}
    }}"""

NGINX_PROXY_HTTP = """\
    upstream up {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""


NGINX_TLS_HTTP = """\
    upstream up {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""


def make_certificate(workdir: Path) -> tuple[str, str]:
    """A self-signed ECDSA P-256 certificate for 127.0.0.1 (openssl CLI), shared by nginx-tls
    and the TLS sidecar so that both do the same cryptography."""
    cert, key = workdir / "bench.crt", workdir / "bench.key"
    openssl = shutil.which("openssl")
    if openssl is None:
        raise BenchError("the TLS targets need the openssl CLI (apt-get install openssl)")
    done = subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise BenchError(f"openssl req failed: {done.stderr.strip()}")
    return str(cert), str(key)


def start_nginx(servers: Servers, nginx: str, name: str, http_block: str, port: int) -> Server:
    """Write <tmp>/<name>/nginx.conf and run nginx in the foreground from that prefix."""
    prefix = servers.workdir / name
    prefix.mkdir()
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = NGINX_MAIN.format(user=user, prefix=prefix, http=http_block)
    (prefix / "nginx.conf").write_text(conf)
    argv = [nginx, "-p", f"{prefix}/", "-c", f"{prefix}/nginx.conf", "-e", f"{prefix}/error.log"]
    server = servers.start(name, [*argv, "-g", "daemon off;"])
    wait_until(lambda: port_open(port), server, f"port {port}")
    return server


def start_nghttpx(servers: Servers, nghttpx: str, port: int, upstream_port: int) -> Server:
    """nghttpx, one worker (as bench/grpc_bench.py runs it): an h2c frontend (prior knowledge)
    proxying to the upstream over HTTP/1.1, the C reference of the HTTP/2 rows."""
    prefix = servers.workdir / "nghttpx"
    prefix.mkdir()
    argv = [
        nghttpx, f"--frontend=127.0.0.1,{port};no-tls",
        f"--backend=127.0.0.1,{upstream_port};;proto=http/1.1", "--workers=1", "--no-ocsp",
        "--conf=/dev/null", f"--errorlog-file={prefix}/error.log",
    ]  # fmt: skip
    server = servers.start("nghttpx-h2c", argv)
    wait_until(lambda: port_open(port), server, f"port {port}")
    return server


# --- the sidecar ---------------------------------------------------------------------------

SIDECAR_YAML = """\
listeners:
  inbound:  {{bind: "127.0.0.1:{inbound}"{inbound_tls}}}
  outbound: {{bind: "127.0.0.1:{outbound}"}}
  api:      {{bind: "127.0.0.1:{api}"}}
  peer:     {{bind: "127.0.0.1:{peer}"}}
  admin:    {{bind: "127.0.0.1:{admin}"}}
app:
  url: "http://127.0.0.1:{upstream}"
upstreams:
  up:
    url: "http://127.0.0.1:{upstream}"
logging: {{level: warning}}
"""


def start_sidecar(
    servers: Servers,
    command: list[str],
    ports: dict[str, int],
    name: str = "sidecar",
    tls: tuple[str, str] | None = None,
    tree: Path = REPO_DIR,
) -> Server:
    """Run `gts-sidecar run --config` on a generated config; wait for admin /readyz = 200.
    With `tls` (certificate, key), its inbound listener terminates TLS. `tree`: where the
    `sidecar` package is imported from (a compiled copy: build_compiled)."""
    config = servers.workdir / f"{name}.yaml"
    inbound_tls = f", tls: {{cert_file: {tls[0]}, key_file: {tls[1]}}}" if tls else ""
    config.write_text(SIDECAR_YAML.format(**ports, inbound_tls=inbound_tls))
    # `python -m sidecar` needs the repo on the path when the package is not installed
    pythonpath = [str(tree), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
    server = servers.start(name, [*command, "run", "--config", str(config)], env, cwd=tree)
    wait_until(lambda: http_ok(ports["admin"], "/readyz"), server, "admin /readyz")
    for listener in ("inbound", "outbound"):
        wait_until(lambda p=ports[listener]: port_open(p), server, f"{listener} listener")
    return server


def build_compiled(workdir: Path) -> Path:
    """A copy of the package with its request path compiled by mypyc (setup.py), as the
    image and scripts/test.sh build it; its `python -m sidecar --version` must say so."""
    tree = workdir / "compiled"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(REPO_DIR / name, tree / name)
    shutil.copytree(
        REPO_DIR / "sidecar", tree / "sidecar", ignore=shutil.ignore_patterns("__pycache__", "*.so")
    )
    env = {**os.environ, "GTS_SIDECAR_COMPILE": "1"}
    argv = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    done = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        raise BenchError(f"the compiled build failed (a C compiler? mypy?):\n{tail}")
    version = subprocess.run(
        [sys.executable, "-m", "sidecar", "--version"],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
    ).stdout
    if "(compiled)" not in version:
        raise BenchError(f"the compiled copy does not run compiled: {version.strip()!r}")
    return tree


# --- wrk -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_us: float
    p99_us: float
    requests: int
    non_2xx: int
    socket_errors: int
    raw: str

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


_UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def to_us(value: str, unit: str) -> float:
    return float(value) * _UNIT_US[unit]


def parse_wrk(text: str) -> WrkResult:
    """Pick Requests/sec, the 50% and 99% latency lines and any errors out of `wrk --latency`."""

    def find(pattern: str) -> re.Match[str]:
        m = re.search(pattern, text, re.MULTILINE)
        if m is None:
            raise BenchError(f"wrk output has no match for {pattern!r}:\n{text}")
        return m

    latency = r"([\d.]+)(us|ms|s|m|h)\s*$"
    p50 = find(r"^\s*50(?:\.0+)?%\s+" + latency)
    p99 = find(r"^\s*99(?:\.0+)?%\s+" + latency)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        rps=float(find(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50_us=to_us(*p50.groups()),
        p99_us=to_us(*p99.groups()),
        requests=int(find(r"^\s*(\d+) requests in").group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in sock.groups()) if sock else 0,
        raw=text,
    )


def wrk_argv(wrk: str, connections: int, seconds: int, url: str) -> list[str]:
    header = f"{XID_HEADER[0]}: {XID_HEADER[1]}"
    return [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-H", header, url]


def run_wrk(pin: list[str], argv: list[str], seconds: int) -> str:
    """Run wrk to completion and return its report."""
    try:
        done = subprocess.run(
            [*pin, *argv], capture_output=True, text=True, timeout=seconds + 30, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {seconds + 30}s: {shlex.join(argv)}") from exc
    if done.returncode != 0:
        raise BenchError(f"wrk exited {done.returncode}: {done.stderr.strip() or done.stdout}")
    return done.stdout


# --- h2load --------------------------------------------------------------------------------


def h2load_argv(
    h2load: str, connections: int, streams: int, seconds: int, url: str, log: Path | str
) -> list[str]:
    """Prior knowledge on an http:// URL; the log gives each request's latency."""
    header = f"{XID_HEADER[0].lower()}: {XID_HEADER[1]}"  # HTTP/2 field names are lower case
    return [
        h2load, "-t1", f"-c{connections}", f"-m{streams}", f"-D{seconds}",
        f"--log-file={log}", "-H", header, url,
    ]  # fmt: skip


def parse_h2load(text: str, latencies_us: list[int]) -> WrkResult:
    """h2load's summary and its per-request latencies, as a WrkResult: requests are those
    done; non-2xx those done without a 2xx; socket errors those failed (errored, timed out)."""

    def find(pattern: str) -> re.Match[str]:
        m = re.search(pattern, text, re.MULTILINE)
        if m is None:
            raise BenchError(f"h2load output has no match for {pattern!r}:\n{text}")
        return m

    rps = float(find(r"^finished in [\d.]+\w+, ([\d.]+) req/s").group(1))
    counts = find(r"^requests: \d+ total, \d+ started, (\d+) done, \d+ succeeded, (\d+) failed")
    done, failed = int(counts.group(1)), int(counts.group(2))
    ok = int(find(r"^status codes: (\d+) 2xx").group(1))
    if not latencies_us:
        raise BenchError(f"h2load logged no request:\n{text}")
    return WrkResult(
        rps=rps,
        p50_us=percentile(latencies_us, 0.50),
        p99_us=percentile(latencies_us, 0.99),
        requests=done,
        non_2xx=max(0, done - ok),
        socket_errors=failed,
        raw=text,
    )


def run_h2load(pin: list[str], argv: list[str], seconds: int, log: Path) -> WrkResult:
    """Run h2load to completion; its report with the latencies of its log."""
    log.unlink(missing_ok=True)  # h2load writes into an existing file without truncating it
    try:
        done = subprocess.run(
            [*pin, *argv], capture_output=True, text=True, timeout=seconds + 30, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(
            f"h2load did not finish within {seconds + 30}s: {shlex.join(argv)}"
        ) from exc
    if done.returncode != 0:
        raise BenchError(f"h2load exited {done.returncode}: {done.stderr.strip() or done.stdout}")
    try:
        return parse_h2load(done.stdout, read_latencies(log))
    finally:
        log.unlink(missing_ok=True)


def h2_get(nghttp: str, url: str, timeout: float = 10.0) -> bytes:
    """One GET over HTTP/2 with prior knowledge (nghttp) with the bench's XID: the body."""
    header = f"{XID_HEADER[0].lower()}: {XID_HEADER[1]}"
    try:
        done = subprocess.run(
            [nghttp, "-H", header, url], capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"nghttp {url}: no answer within {timeout:.0f}s") from exc
    if done.returncode != 0:
        raise BenchError(f"nghttp {url} exited {done.returncode}: {done.stderr.decode().strip()}")
    return done.stdout


# --- targets and the run -------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    path: str = "/"
    tls: bool = False
    #: loaded with h2load (HTTP/2, prior knowledge), checked with nghttp
    h2: bool = False
    failure: str | None = None
    #: connections -> one result per round
    results: dict[int, list[WrkResult]] = field(default_factory=dict)
    #: the process (group) that serves this target: its CPU time and RSS are measured
    server: Server | None = None
    #: connections -> per round, the CPU time (user, system) the serving process group spent
    #: per request, in µs
    cpu_us: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    #: VmRSS of the serving process group, KiB: idle after start, and per round the peak
    #: sampled during the throughput set's measured run
    rss_idle_kib: int | None = None
    rss_load_kib: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{self.path}"


def check_target(target: Target, tools: dict[str, str]) -> None:
    """One request before measuring: the target must answer 200 with the upstream's body."""
    if target.h2:
        # nghttp prints the body only: any error (the sidecar's JSON, nghttpx's page) differs
        body = h2_get(tools["nghttp"], target.url)
        if body != UPSTREAM_BODY:
            raise BenchError(
                f"{target.name}: {target.url} over HTTP/2 answered {body[:300]!r}, "
                f"expected {UPSTREAM_BODY!r}"
            )
        return
    try:
        status, body = http_get(target.port, target.path, tls=target.tls)
    except OSError as exc:
        raise BenchError(f"{target.name}: request to {target.url} failed: {exc}") from exc
    if status != 200 or body != UPSTREAM_BODY:
        raise BenchError(
            f"{target.name}: {target.url} answered {status} {body[:300]!r}, "
            f"expected 200 {UPSTREAM_BODY!r}"
        )


def start_targets(
    servers: Servers, tools: dict[str, str], opts: Options, h2_problem: str | None = None
) -> list[Target]:
    """Start the upstream and every proxy the chosen targets need; a proxy that fails to start is
    recorded on its targets (and its log tail printed) instead of aborting the run.
    `h2_problem`: why the HTTP/2 tools cannot be had (their targets then fail)."""
    wanted = opts.targets
    names = ("upstream", "proxy", "nghttpx", "inbound", "outbound", "api", "peer", "admin")
    tls_names = ("nginx-tls", "tls-inbound", "tls-outbound", "tls-api", "tls-peer", "tls-admin")
    listeners = ("inbound", "outbound", "api", "peer", "admin")
    c_names = tuple(f"c-{k}" for k in listeners)
    all_ports = free_ports(len(names) + len(tls_names) + len(c_names))
    ports = dict(zip(names + tls_names + c_names, all_ports, strict=True))
    upstream_http = NGINX_UPSTREAM_HTTP.format(port=ports["upstream"])
    upstream = start_nginx(servers, tools["nginx"], "upstream", upstream_http, ports["upstream"])

    targets = {
        "direct": Target("direct", ports["upstream"]),
        "nginx-proxy": Target("nginx-proxy", ports["proxy"]),
        "sidecar-inbound": Target("sidecar-inbound", ports["inbound"]),
        "sidecar-outbound": Target("sidecar-outbound", ports["outbound"], "/up/"),
        "sidecar-inbound-compiled": Target("sidecar-inbound-compiled", ports["c-inbound"]),
        "sidecar-outbound-compiled": Target(
            "sidecar-outbound-compiled", ports["c-outbound"], "/up/"
        ),
        "nginx-tls": Target("nginx-tls", ports["nginx-tls"], tls=True),
        "sidecar-inbound-tls": Target("sidecar-inbound-tls", ports["tls-inbound"], tls=True),
        # the inbound listeners of the sidecars above, spoken to in HTTP/2
        "nghttpx-h2c": Target("nghttpx-h2c", ports["nghttpx"], h2=True),
        "sidecar-inbound-h2c": Target("sidecar-inbound-h2c", ports["inbound"], h2=True),
        "sidecar-inbound-h2c-compiled": Target(
            "sidecar-inbound-h2c-compiled", ports["c-inbound"], h2=True
        ),
    }
    if h2_problem is not None:
        for name in H2_TARGETS:
            targets[name].failure = f"HTTP/2 tools missing: {h2_problem}"
    tls_wanted = [targets[t] for t in ("nginx-tls", "sidecar-inbound-tls") if t in wanted]
    pair: tuple[str, str] | None = None
    if tls_wanted:
        with reported_failure(tls_wanted):
            pair = make_certificate(servers.workdir)
    if "nginx-tls" in wanted and pair is not None:
        tls_http = NGINX_TLS_HTTP.format(
            port=ports["nginx-tls"], upstream_port=ports["upstream"], cert=pair[0], key=pair[1]
        )
        with reported_failure([targets["nginx-tls"]]):
            targets["nginx-tls"].server = start_nginx(
                servers, tools["nginx"], "nginx-tls", tls_http, ports["nginx-tls"]
            )
    if "sidecar-inbound-tls" in wanted and pair is not None:
        tls_ports = {k: ports[f"tls-{k}"] for k in ("inbound", "outbound", "api", "peer", "admin")}
        tls_ports["upstream"] = ports["upstream"]
        with reported_failure([targets["sidecar-inbound-tls"]]):
            targets["sidecar-inbound-tls"].server = start_sidecar(
                servers, opts.sidecar_cmd, tls_ports, "sidecar-tls", pair
            )
    if "nginx-proxy" in wanted:
        proxy_http = NGINX_PROXY_HTTP.format(port=ports["proxy"], upstream_port=ports["upstream"])
        with reported_failure([targets["nginx-proxy"]]):
            targets["nginx-proxy"].server = start_nginx(
                servers, tools["nginx"], "nginx-proxy", proxy_http, ports["proxy"]
            )
    if "nghttpx-h2c" in wanted and h2_problem is None:
        with reported_failure([targets["nghttpx-h2c"]]):
            targets["nghttpx-h2c"].server = start_nghttpx(
                servers, tools["nghttpx"], ports["nghttpx"], ports["upstream"]
            )
    sidecar_targets = [targets[t] for t in SIDECAR_TARGETS if t in wanted]
    sidecar_targets = [t for t in sidecar_targets if t.failure is None]
    if sidecar_targets:
        sidecar_ports = {k: ports[k] for k in names if k not in ("proxy", "nghttpx")}
        with reported_failure(sidecar_targets):
            sidecar = start_sidecar(servers, opts.sidecar_cmd, sidecar_ports)
            for target in sidecar_targets:
                target.server = sidecar
    compiled_targets = [targets[t] for t in COMPILED_TARGETS if t in wanted]
    compiled_targets = [t for t in compiled_targets if t.failure is None]
    if compiled_targets:
        c_ports = {k: ports[f"c-{k}"] for k in listeners}
        c_ports["upstream"] = ports["upstream"]
        with reported_failure(compiled_targets):
            tree = build_compiled(servers.workdir)
            compiled = start_sidecar(
                servers, [sys.executable, "-m", "sidecar"], c_ports, "sidecar-compiled", tree=tree
            )
            for target in compiled_targets:
                target.server = compiled

    targets["direct"].server = upstream
    chosen = [targets[t] for t in wanted]
    for target in chosen:
        if target.failure is None:
            with reported_failure([target]):
                check_target(target, tools)
    return chosen


@contextlib.contextmanager
def reported_failure(targets: list[Target]) -> Iterator[None]:
    """Turn a BenchError into a failure recorded on `targets`, printed with the log tail."""
    try:
        yield
    except BenchError as exc:
        exc.report("!! ")
        for target in targets:
            target.failure = exc.message


def measure(
    targets: list[Target], opts: Options, tools: dict[str, str], pin: list[str], workdir: Path
) -> None:
    """Idle RSS of every live target, then `opts.rounds` rounds; in each, both wrk sets over
    every live target in the same order: a warm-up, then the measured run. The HTTP/2 targets
    are loaded by h2load in the throughput set only (their results filed under its
    connections); the latency set's "added over direct" compares wrk's HTTP/1.1 figures."""
    live = [t for t in targets if t.failure is None]
    time.sleep(IDLE_SETTLE_S)  # after the check request: nothing in flight
    for target in live:
        target.rss_idle_kib = group_rss_kib(target.server)
    for round_no in range(1, opts.rounds + 1):
        for connections in (opts.connections, 1):
            for target in targets:
                if target.failure is not None or (target.h2 and connections == 1):
                    continue
                load = (
                    f"h2load -c{opts.h2_connections} -m{opts.h2_streams}"
                    if target.h2
                    else f"c={connections}"
                )
                print(
                    f"# round {round_no}/{opts.rounds} {target.name}: {load} ...",
                    file=sys.stderr,
                    flush=True,
                )
                with reported_failure([target]):
                    measure_one(target, connections, opts, tools, pin, workdir)


def measure_one(
    target: Target,
    connections: int,
    opts: Options,
    tools: dict[str, str],
    pin: list[str],
    workdir: Path,
) -> None:
    def load(seconds: int) -> WrkResult:
        if target.h2:
            log = workdir / "h2load.log"
            c, m = opts.h2_connections, opts.h2_streams
            argv = h2load_argv(tools["h2load"], c, m, seconds, target.url, log)
            return run_h2load(pin, argv, seconds, log)
        argv = wrk_argv(tools["wrk"], connections, seconds, target.url)
        return parse_wrk(run_wrk(pin, argv, seconds))

    load(opts.warmup_s)
    before = group_cpu_seconds(target.server)
    sampled = target.server if connections == opts.connections else None
    with RssPeak(sampled) as peak:
        result = load(opts.duration_s)
    after = group_cpu_seconds(target.server)
    target.results.setdefault(connections, []).append(result)
    if connections == opts.connections and peak.kib is not None:
        target.rss_load_kib.append(peak.kib)
    if before is not None and after is not None and result.requests:
        per = 1e6 / result.requests
        cpu = ((after[0] - before[0]) * per, (after[1] - before[1]) * per)
        target.cpu_us.setdefault(connections, []).append(cpu)
    if result.errors:
        print(
            f"!! {target.name} c={connections}: {result.non_2xx} non-2xx, "
            f"{result.socket_errors} socket errors",
            file=sys.stderr,
        )


def group_pids(server: Server) -> list[int]:
    """Every process in the server's process group (nginx's master and worker; the sidecar)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # after the comm: state ppid pgrp ...
        if int(stat.rpartition(")")[2].split()[2]) == server.popen.pid:
            pids.append(int(entry.name))
    return pids


def group_cpu_seconds(server: Server | None) -> tuple[float, float] | None:
    """(user, system) CPU seconds of every process in the server's process group, from /proc.
    Unlike requests/s, CPU time per request hardly moves when other work shares the machine."""
    if server is None:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for pid in group_pids(server):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        # after the comm: state ppid pgrp session tty tpgid flags minflt cminflt majflt
        # cmajflt utime stime
        user += int(fields[11])
        system += int(fields[12])
    return user / tick, system / tick


def pids_rss_kib(pids: list[int]) -> int | None:
    """VmRSS summed over `pids`, KiB (shared pages of nginx's master and worker count twice,
    as `ps` would show them); None when none could be read."""
    total, seen = 0, False
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
                seen = True
                break
    return total if seen else None


def group_rss_kib(server: Server | None) -> int | None:
    return None if server is None else pids_rss_kib(group_pids(server))


class RssPeak:
    """Samples a server's RSS every RSS_SAMPLE_S from a thread while the block runs; `kib`
    is the peak seen (the process group is listed once, at the start: reading only its
    /proc/PID/status files keeps the sampler's own CPU use negligible)."""

    def __init__(self, server: Server | None) -> None:
        self.pids = group_pids(server) if server is not None else []
        self.kib: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        kib = pids_rss_kib(self.pids)
        if kib is not None and (self.kib is None or kib > self.kib):
            self.kib = kib

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            self._sample()

    def __enter__(self) -> RssPeak:
        if self.pids:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pids:
            self._stop.set()
            self._thread.join()
            self._sample()


# --- report --------------------------------------------------------------------------------


def cpu_busy_share(seconds: float = 1.0) -> float | None:
    """Share of all CPUs' time spent busy over `seconds`, from /proc/stat (None if unknown)."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return 1.0 - (idle1 - idle0) / total if total > 0 else None


def check_idle() -> str:
    """Measure how busy the machine is before we start; warn on stderr when it is not idle."""
    busy = cpu_busy_share()
    if busy is None:
        return "unknown"
    if busy > BUSY_SHARE:
        print(
            f"!! the CPUs are {busy:.0%} busy before the benchmark: other work on this machine "
            "will skew the figures; run on an idle machine",
            file=sys.stderr,
        )
    return f"{busy:.0%}"


def wrk_version(wrk: str) -> str:
    """`wrk -v` prints its version but exits 1 (it wants a URL): read it anyway."""
    try:
        done = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0].strip() if first else "unknown"


def machine_facts(tools: dict[str, str], pinning: str, busy_before: str) -> list[tuple[str, str]]:
    commit = command_output(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"])
    return [
        ("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")),
        ("nproc", f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable)"),
        ("CPU", cpu_model()),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("nginx", command_output([tools["nginx"], "-v"])),
        ("wrk", wrk_version(tools["wrk"])),
        *(
            (tool, command_output([tools[tool], "--version"]))
            for tool in ("h2load", "nghttpx")
            if tool in tools
        ),
        ("pinning", pinning),
        ("CPU busy before start (all CPUs, 1 s)", busy_before),
        ("repo commit", commit + " (plus any uncommitted changes)"),
    ]


def fmt_ms(us: float) -> str:
    return f"{us / 1000:.3f}"


def spread(values: Sequence[float], fmt: Callable[[float], str]) -> str:
    """One figure, or over several rounds its median and (min–max)."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt(values[0])
    low, mid, high = fmt(min(values)), fmt(statistics.median(values)), fmt(max(values))
    return mid if low == high else f"{mid} ({low}–{high})"


def median(values: Sequence[float], fmt: Callable[[float], str]) -> str:
    return fmt(statistics.median(values)) if values else "n/a"


def _ratio(v: float) -> str:
    return f"{v:.2f}×"


def _mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def results_table(targets: list[Target], connections: int) -> list[str]:
    by_name = {t.name: t for t in targets}

    def reference(t: Target) -> Target | None:
        return by_name.get(REFERENCE.get(t.name, "nginx-proxy"))

    def per_round(
        mine: Sequence[float], theirs: Sequence[float], f: Callable[[float, float], float]
    ) -> list[float]:
        # a ratio within each round: the two runs seconds apart, not rounds apart
        return [f(a, b) for a, b in zip(mine, theirs, strict=False) if a and b]

    direct = by_name.get("direct")
    direct_c1 = [r.p50_us for r in direct.results.get(1, [])] if direct else []

    rows = [
        "| target | rps | ratio vs its reference | p50 (ms) | p99 (ms) "
        "| p50 added over direct at c=1 (µs) | CPU µs per request = user + sys "
        "| CPU ratio (its reference's / its own) | RSS idle (MiB) | RSS under load (MiB) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for t in targets:
        if t.failure is not None:
            rows.append(f"| {t.name} | FAILED |" + " – |" * 8)
            continue
        tput, lat = t.results.get(connections, []), t.results.get(1, [])
        ref = reference(t)
        ref_tput = ref.results.get(connections, []) if ref else []
        rps = [r.rps for r in tput]
        cells = [t.name, spread(rps, lambda v: f"{v:,.0f}")]
        cells.append(spread(per_round(rps, [r.rps for r in ref_tput], lambda a, b: a / b), _ratio))
        cells.append(spread([r.p50_us for r in tput], fmt_ms))
        cells.append(spread([r.p99_us for r in tput], fmt_ms))
        cells.append(
            spread(
                [a - b for a, b in zip([r.p50_us for r in lat], direct_c1, strict=False)],
                lambda v: f"{v:+.0f}",
            )
        )
        cpu = t.cpu_us.get(connections, [])
        total = [u + k for u, k in cpu]
        if cpu:
            # the split as medians; the range on the total
            one = "{:.1f}".format
            user, system = median([u for u, _ in cpu], one), median([k for _, k in cpu], one)
            cells.append(f"{spread(total, one)} = {user} + {system}")
        else:
            cells.append("n/a")
        ref_cpu = [u + k for u, k in ref.cpu_us.get(connections, [])] if ref else []
        cells.append(spread(per_round(total, ref_cpu, lambda a, b: b / a), _ratio))
        cells.append(_mib(t.rss_idle_kib) if t.rss_idle_kib else "n/a")
        cells.append(spread(t.rss_load_kib, _mib))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def run_label(t: Target, connections: int, opts: Options) -> str:
    """Which load a result is from: wrk's connections, or h2load's connections x streams."""
    if t.h2:
        return f"h2load -c{opts.h2_connections} -m{opts.h2_streams}"
    return f"c={connections}"


def render_report(
    targets: list[Target],
    opts: Options,
    facts: list[tuple[str, str]],
    wrk: str,
    left_out: str | None = None,
    h2load: str | None = None,
) -> str:
    c = opts.connections
    h2_rows = [t for t in targets if t.h2]
    h2_text = (
        [
            "",
            f"HTTP/2 rows ({', '.join(t.name for t in h2_rows)}): h2load with prior knowledge "
            f"(h2c), `-t1 -c{opts.h2_connections} -m{opts.h2_streams}` "
            f"({opts.h2_connections * opts.h2_streams} streams in flight, about the throughput "
            "set's requests in flight, on few multiplexed connections as a gRPC channel keeps "
            "them), the same durations, the XID as a lower-case field; p50 and p99 from "
            "h2load's per-request log. Each sidecar row is its sidecar's inbound listener "
            "spoken to in HTTP/2 (the app, the same upstream, over HTTP/1.1); its reference is "
            "nghttpx (1 worker), an h2c frontend proxying to the same upstream over HTTP/1.1. "
            "They have no latency set: the c=1 column compares wrk's HTTP/1.1 figures.",
        ]
        if h2_rows
        else []
    )
    rounds = (
        f"{opts.rounds} interleaved rounds (each runs every target once, in this order); "
        "each cell is the median over the rounds with its (min–max), and each ratio is "
        "taken within a round."
        if opts.rounds > 1
        else "One round."
    )
    lines = [
        "# gts-sidecar proxy benchmark",
        "",
        f'Same upstream (nginx `return 200 "ok\\n"`), every request with '
        f"`{XID_HEADER[0]}: {XID_HEADER[1]}`. Throughput set: wrk `-t1 -c{c}`; latency set: "
        f"wrk `-t1 -c1`; {opts.duration_s} s per run after a {opts.warmup_s} s warm-up. " + rounds,
        "rps, p50 and p99 are from the throughput set; so is CPU per request: user and "
        "system time of the target's own processes (not the upstream's, nor wrk's) over the "
        "measured run, divided by its requests. On a busy machine rps moves with the other "
        "load; CPU per request much less, so its ratio is the steadier comparison. RSS: VmRSS "
        "of the target's processes (nginx: master + worker, added), idle "
        f"{IDLE_SETTLE_S:.0f} s after start and one request, and the peak sampled every "
        f"{RSS_SAMPLE_S * 1000:.0f} ms during the throughput run; the rows of one sidecar "
        "(inbound, outbound, inbound in HTTP/2) are one process. The ratios are against "
        "each row's reference: nginx-proxy for plain HTTP/1.1, nginx-tls for the TLS rows, "
        "nghttpx-h2c for the HTTP/2 rows.",
        *h2_text,
        "",
        *results_table(targets, c),
        "",
    ]
    notes = [f"- **{t.name}** failed: {t.failure}" for t in targets if t.failure]
    for t in targets:
        for conns, runs in sorted(t.results.items(), reverse=True):
            for round_no, r in enumerate(runs, 1):
                if r.errors:
                    notes.append(
                        f"- **{t.name}** {run_label(t, conns, opts)} round {round_no}: "
                        f"{r.non_2xx} non-2xx "
                        f"responses and {r.socket_errors} socket errors out of {r.requests} "
                        "requests (its figures are suspect)"
                    )
    if left_out is not None:
        notes.append(left_out)
    if notes:
        lines += ["Problems:", "", *notes, ""]
    lines += ["## Machine", "", *(f"- {k}: {v}" for k, v in facts), ""]
    lines += [
        "## Command",
        "",
        "```",
        shlex.join(sys.orig_argv),
        "```",
        "",
        "wrk, per target (URL varies):",
        "",
        "```",
        shlex.join(wrk_argv(Path(wrk).name, c, opts.duration_s, "URL")),
        shlex.join(wrk_argv(Path(wrk).name, 1, opts.duration_s, "URL")),
        "```",
        "",
    ]
    if h2_rows and h2load is not None:
        argv = h2load_argv(
            Path(h2load).name, opts.h2_connections, opts.h2_streams, opts.duration_s, "URL", "LOG"
        )
        lines += ["h2load, per HTTP/2 target:", "", "```", shlex.join(argv), "```", ""]
    return "\n".join(lines)


def raw_outputs(targets: list[Target], opts: Options) -> str:
    parts = ["## Raw wrk and h2load output", ""]
    for t in targets:
        for conns, runs in sorted(t.results.items(), reverse=True):
            for round_no, r in enumerate(runs, 1):
                summary = f"{t.name}, {run_label(t, conns, opts)}" + (
                    f", round {round_no}" if len(runs) > 1 else ""
                )
                parts += [f"<details><summary>{summary}</summary>", "", "```"]
                parts += [r.raw.rstrip(), "```", "", "</details>", ""]
    return "\n".join(parts)


# --- main ----------------------------------------------------------------------------------


def _terminate_on_sigterm() -> None:
    """Make SIGTERM/SIGHUP unwind like Ctrl-C so the servers are stopped."""

    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def h2_tools_or_leave_out(
    opts: Options, tools: dict[str, str]
) -> tuple[Options, str | None, str | None]:
    """Add the HTTP/2 tools to `tools` when HTTP/2 targets are wanted. If they cannot be had:
    asked for by --targets, (opts, why, None) and those targets fail; in the default list,
    they are left out, and the third value is the report's note saying so."""
    if not any(t in H2_TARGETS for t in opts.targets):
        return opts, None, None
    try:
        tools.update(ensure_h2_tools())
    except BenchError as exc:
        exc.report("!! HTTP/2 rows: ")
        if opts.targets_explicit:
            return opts, exc.message, None
        rest = tuple(t for t in opts.targets if t not in H2_TARGETS)
        packages = " ".join(sorted(set(H2_TOOL_PACKAGES.values())))
        note = (
            f"- the HTTP/2 rows ({', '.join(H2_TARGETS)}) were left out: {exc.message} "
            f"(they need h2load, nghttp and nghttpx: Debian's {packages})"
        )
        return dataclasses.replace(opts, targets=rest), None, note
    return opts, None, None


def run(opts: Options) -> int:
    tools = ensure_tools()
    opts, h2_problem, left_out = h2_tools_or_leave_out(opts, tools)
    server_pin, client_pin, pinning = cpu_pinning()
    busy_before = check_idle()
    with tempfile.TemporaryDirectory(prefix="proxy-bench-") as tmp:
        servers = Servers(Path(tmp), server_pin)
        try:
            targets = start_targets(servers, tools, opts, h2_problem)
            measure(targets, opts, tools, client_pin, Path(tmp))
        finally:
            servers.stop_all()
    facts = machine_facts(tools, pinning, busy_before)
    report = render_report(targets, opts, facts, tools["wrk"], left_out, tools.get("h2load"))
    print(report)
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(report + "\n" + raw_outputs(targets, opts))
    print(f"# written to {opts.output}", file=sys.stderr)
    clean = all(
        t.failure is None and not any(r.errors for runs in t.results.values() for r in runs)
        for t in targets
    )
    return 0 if clean else 1


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    _terminate_on_sigterm()
    try:
        return run(opts)
    except BenchError as exc:
        exc.report("proxy_bench: ")
        return 2
    except KeyboardInterrupt:
        print("proxy_bench: interrupted; servers stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
