"""Idle memory of `gts-sidecar run` with the example config: VmRSS (split into RssAnon, the
process's own heap, and RssFile, mapped libraries and code) right after start with nothing
in flight, and again after one request on every listener and the kubelet's probes.

Why both: a library imported lazily that the first probe or request loads anyway saves
nothing in production, where the sidecar serves from its first second on. The second figure
is what a pod holds once it is in service.

The example config (config/sidecar.yaml) is used as it is, except that its five listeners
move to free loopback ports, `app.url` and the `inventory` upstream point at a small app this
script serves, and the journal goes to a temporary directory. The requests: inbound GET
(proxied to the app), outbound GET /inventory/ (proxied), a transaction begun and committed
on the api listener (the engine and the SQLite journal), an unsigned peer call (refused 401),
admin /healthz, /readyz, /metrics.

    .venv/bin/python bench/idle_rss.py [--rounds N] [--settle SECONDS] [--env NAME=VALUE ...]

Only the standard library; the sidecar runs as `.venv/bin/gts-sidecar` (or the `--command`).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import http.server
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_DIR / "config" / "sidecar.yaml"
LISTENERS = ("inbound", "outbound", "api", "peer", "admin")
FIELDS = ("VmRSS", "RssAnon", "RssFile")


class _App(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's naming)
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(directory: Path, app_port: int) -> tuple[Path, dict[str, int]]:
    """The example config with its listeners on free ports, app and upstream on ours (edited
    as text: bench/ uses the standard library only, and the file's comments stay)."""
    ports = {name: _free_port() for name in LISTENERS}
    text = EXAMPLE.read_text()
    out = []
    listener: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        key = stripped.split(":", 1)[0]
        if line.startswith("  ") and not line.startswith("   ") and key in LISTENERS:
            listener = key
        if listener and stripped.startswith("bind:"):
            line = line.split("bind:")[0] + f"bind: 127.0.0.1:{ports[listener]}"
            listener = None
        if stripped.startswith("url: http://127.0.0.1:808"):
            line = line.split("url:")[0] + f"url: http://127.0.0.1:{app_port}"
        if stripped.startswith("journal: sqlite:"):
            line = line.split("journal:")[0] + f"journal: sqlite:///{directory}/journal.db"
        out.append(line)
    path = directory / "sidecar.yaml"
    path.write_text("\n".join(out) + "\n")
    return path, ports


def _memory(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon, RssFile of `pid`, MiB (the kernel's "kB" are KiB)."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in FIELDS:
            values[name] = int(rest.split()[0]) / 1024
    return values


def _listening(ports: dict[str, int]) -> bool:
    """All listeners bound: read from /proc/net/tcp, so no connection is made to find out."""
    wanted = {f"{port:04X}" for port in ports.values()}
    seen = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A":  # LISTEN
            seen.add(fields[1].rsplit(":", 1)[1])
    return wanted <= seen


def _call(port: int, method: str, path: str, body: bytes = b"", **headers: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        if method == "POST" and path == "/v1/transactions":
            if response.status != 200:
                raise SystemExit(f"begin answered {response.status}: {data[:300]!r}")
            xid = json.loads(data)["xid"]
            conn.request("POST", f"/v1/transactions/{xid}/commit", body=b"")
            response = conn.getresponse()
            response.read()
        return response.status
    finally:
        conn.close()


def _exercise(ports: dict[str, int]) -> dict[str, int]:
    return {
        "inbound GET /": _call(ports["inbound"], "GET", "/"),
        "outbound GET /inventory/x": _call(ports["outbound"], "GET", "/inventory/x"),
        "api begin+commit": _call(
            ports["api"],
            "POST",
            "/v1/transactions",
            b'{"name": "idle-rss"}',
            **{"Content-Type": "application/json"},
        ),
        "peer unsigned": _call(ports["peer"], "GET", "/api/v1/transaction/x"),
        "admin /healthz": _call(ports["admin"], "GET", "/healthz"),
        "admin /readyz": _call(ports["admin"], "GET", "/readyz"),
        "admin /metrics": _call(ports["admin"], "GET", "/metrics"),
    }


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The sidecar's environment: ours without PYTHONDONTWRITEBYTECODE (a process that
    compiles its modules from source holds ~1.4 MiB more than one loading `.pyc` files, as an
    installed package does), plus `--env` settings."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, **extra}


def compile_package(python: str) -> None:
    """Bring the sidecar's `.pyc` files up to date, as `pip install` leaves them."""
    subprocess.run(
        [python, "-m", "compileall", "-q", str(REPO_DIR / "sidecar")],
        check=True,
        env=child_env({}),
        stdout=subprocess.DEVNULL,
    )


def one_round(command: list[str], env: dict[str, str], settle: float) -> dict[str, object]:
    app = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _App)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        path, ports = _config(Path(tmp), app.server_address[1])
        proc = subprocess.Popen(
            [*command, "run", "--config", str(path)],
            cwd=tmp,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 60
            while not _listening(ports):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the sidecar did not start:\n{proc.stderr.read().decode()}")  # type: ignore[union-attr]
                time.sleep(0.05)
            time.sleep(settle)
            idle = _memory(proc.pid)
            statuses = _exercise(ports)
            time.sleep(settle)
            served = _memory(proc.pid)
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            if proc.poll() is None:
                proc.kill()
            app.shutdown()
    return {"idle": idle, "served": served, "statuses": statuses}


#: what the ladder imports, step by step in one interpreter: (label, code run at that step)
LADDER = (
    ("nothing (CPython 3.11)", ""),
    ("asyncio (with ssl and OpenSSL, concurrent.futures, subprocess)", "import asyncio"),
    (
        "uvloop, httptools, sqlite3, PyYAML, orjson",
        "import uvloop, httptools, sqlite3, yaml, orjson",
    ),
    (
        "aiohttp.web (the package imports its client too: two SSL contexts with the CA bundle)",
        "import aiohttp.web",
    ),
    (
        "sidecar.config (its schemas, on sidecar/schema.py: dataclasses and typing)",
        "import sidecar.config",
    ),
    (
        "the rest of the sidecar's modules (sidecar.cli, sidecar.server)",
        "import sidecar.cli, sidecar.server",
    ),
)

_LADDER_CHILD = """
import json, sys
def rss():
    values = {}
    for line in open("/proc/self/status"):
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            values[name] = int(rest.split()[0]) / 1024
    return values
for code in json.loads(sys.argv[1]):
    exec(code)
    print(json.dumps(rss()))
"""


#: the LADDER steps that are third-party libraries (by index): each is also left out in turn,
#: to show what it costs given all the others (shared dependencies counted once)
LIBRARY_STEPS = (2, 3)
LIBRARIES_END = 4  # LADDER[:4]: the interpreter and the libraries, none of the sidecar's code


def ladder(
    python: str, env: dict[str, str], steps: list[str] | None = None
) -> list[dict[str, float]]:
    """VmRSS after each step (LADDER's by default), in one fresh interpreter run from a
    temp dir."""
    codes = steps if steps is not None else [code for _, code in LADDER]
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [python, "-c", _LADDER_CHILD, json.dumps(codes)],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            check=True,
        )
    return [json.loads(line) for line in out.stdout.splitlines()]


def print_ladder(runs: list[list[dict[str, float]]], rounds: list[dict[str, object]]) -> None:
    """A markdown table: median VmRSS per step and what each step added (anon / file)."""
    print("| imported | VmRSS MiB | added | of which RssAnon / RssFile |")
    print("|---|--:|--:|--:|")
    rows = [
        (label, {f: statistics.median(run[i][f] for run in runs) for f in FIELDS})
        for i, (label, _) in enumerate(LADDER)
    ]
    for phase, label in (
        ("idle", "started: `gts-sidecar run`, idle"),
        ("served", "after one request on every listener and the probes"),
    ):
        rows.append(
            (label, {f: statistics.median(r[phase][f] for r in rounds) for f in FIELDS})  # type: ignore[index]
        )
    previous: dict[str, float] | None = None
    for label, values in rows:
        if previous is None:
            added = ""
        else:
            added = (
                f"+{values['VmRSS'] - previous['VmRSS']:.1f} | "
                f"{values['RssAnon'] - previous['RssAnon']:+.1f} / "
                f"{values['RssFile'] - previous['RssFile']:+.1f}"
            )
        print(f"| {label} | {values['VmRSS']:.1f} | {added or ' | '} |")
        previous = values


def leave_one_out(python: str, env: dict[str, str], rounds: int) -> None:
    """A markdown table: each library's cost given all the others (the libraries imported
    with and without it, in fresh interpreters, medians over `rounds`)."""
    libraries = [code for _, code in LADDER[:LIBRARIES_END]]
    full = statistics.median(ladder(python, env, libraries)[-1]["VmRSS"] for _ in range(rounds))
    print(f"all the libraries (LADDER up to aiohttp.web): VmRSS {full:.1f} MiB")
    print("| left out | VmRSS MiB without it | what it costs given the others |")
    print("|---|--:|--:|")
    for index in LIBRARY_STEPS:
        steps = [code for i, code in enumerate(libraries) if i != index]
        without = statistics.median(ladder(python, env, steps)[-1]["VmRSS"] for _ in range(rounds))
        print(f"| {LADDER[index][0]} | {without:.1f} | {full - without:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before each reading")
    parser.add_argument(
        "--command",
        default=str(REPO_DIR / ".venv" / "bin" / "gts-sidecar"),
        help="how to start the sidecar (split like a shell would)",
    )
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--json", action="store_true", help="print each round as JSON too")
    parser.add_argument(
        "--ladder",
        action="store_true",
        help="also import the libraries step by step in a bare interpreter (--rounds times) "
        "and print a markdown table of what each step adds",
    )
    args = parser.parse_args()
    env = child_env(dict(item.split("=", 1) for item in args.env))
    compile_package(str(REPO_DIR / ".venv" / "bin" / "python"))
    rounds = [one_round(shlex.split(args.command), env, args.settle) for _ in range(args.rounds)]
    if args.json:
        for r in rounds:
            print(json.dumps(r))
    print(f"statuses: {rounds[-1]['statuses']}")
    print(f"{'MiB (min / median / max)':<24}" + "".join(f"{f:>24}" for f in FIELDS))
    for phase in ("idle", "served"):
        cells = []
        for field in FIELDS:
            values = [r[phase][field] for r in rounds]  # type: ignore[index]
            cells.append(f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f}")
        print(f"{phase:<24}" + "".join(f"{c:>24}" for c in cells))
    if args.ladder:
        python = str(REPO_DIR / ".venv" / "bin" / "python")
        print_ladder([ladder(python, env) for _ in range(args.rounds)], rounds)
        leave_one_out(python, env, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
