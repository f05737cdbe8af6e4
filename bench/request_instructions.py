"""Instructions per proxied request, counted by valgrind's callgrind: a figure that does not
move with the machine's other load (the same binary, inputs and environment give the same
count), so a change to the request path can be judged on a shared machine, where requests/s
and CPU time per request cannot.

The sidecar runs under `valgrind --tool=callgrind` (about 50 times slower) with the same
config as bench/proxy_bench.py (the app and upstream `up` are one nginx `return 200`); wrk
warms both listeners up, then for each listener the counters are zeroed
(`callgrind_control -z`), wrk runs `--seconds` at `--connections`, and the counters are dumped
(`callgrind_control -d`): the instructions the sidecar's process executed in user space in
that window, divided by the requests wrk completed. The kernel's share (the socket calls) is
not counted; bench/proxy_bench.py measures it. `--top N` lists the functions with the most
instructions of their own (per request) for each listener.

    .venv/bin/python bench/request_instructions.py [--pure] [--seconds 8] [--connections 10]
                                                   [--top 25]

The compiled build (mypyc, built into a temporary copy as proxy_bench does) is measured
unless `--pure`. Needs valgrind (Debian's `valgrind`), nginx and wrk (installed as
bench/proxy_bench.py installs them). Standard library only.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import proxy_bench as pb
from benchkit import BenchError

#: valgrind slows the start of the interpreter and the imports fifty-fold
START_TIMEOUT = 180.0


def callgrind_totals(path: Path) -> int:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise BenchError(f"no totals in {path}")


def self_costs(path: Path) -> collections.Counter[str]:
    """Instructions of each function's own code (callees excluded), from callgrind's format:
    `fn=(id) name` opens a function, cost lines follow, and a `calls=` line makes the next
    cost line a callee's inclusive cost, which is not the caller's own."""
    names: dict[str, str] = {}
    costs: collections.Counter[str] = collections.Counter()
    fn = ""
    after_calls = False
    ref = re.compile(r"\((\d+)\)(?:\s+(.*))?")

    def resolve(token: str) -> str:
        m = ref.match(token)
        if m is None:
            return token
        if m.group(2):
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), token)

    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("fn="):
            fn = resolve(line[3:])
        elif line.startswith("cfn="):
            resolve(line[4:])
        elif line.startswith("calls="):
            after_calls = True
        elif line[:1].isdigit() or line[:1] in ("+", "-", "*"):
            if after_calls:
                after_calls = False
            else:
                parts = line.split()
                if len(parts) > 1:
                    costs[fn] += int(parts[1])
    return costs


def measure(opts: argparse.Namespace) -> int:
    tools = pb.ensure_tools()
    tools |= pb.ensure_packages({"valgrind": "valgrind", "callgrind_control": "valgrind"})
    valgrind, control = tools["valgrind"], tools["callgrind_control"]
    with tempfile.TemporaryDirectory(prefix="gts-instr-") as tmp:
        work = Path(tmp)
        servers = pb.Servers(work, [])
        try:
            names = ("upstream", "inbound", "outbound", "api", "peer", "admin")
            ports = dict(zip(names, pb.free_ports(len(names)), strict=True))
            http = pb.NGINX_UPSTREAM_HTTP.format(port=ports["upstream"])
            pb.start_nginx(servers, tools["nginx"], "upstream", http, ports["upstream"])
            tree = pb.REPO_DIR if opts.pure else pb.build_compiled(work)
            out = work / "callgrind.%p.out"
            command = [valgrind, "--tool=callgrind", f"--callgrind-out-file={out}"]
            command += [sys.executable, "-m", "sidecar"]
            # start_sidecar waits with wait_until's default timeout, made for a sidecar at
            # full speed
            pb.wait_until.__defaults__ = (START_TIMEOUT,)
            sidecar = pb.start_sidecar(servers, command, ports, tree=tree)
            targets = (("inbound", "/"), ("outbound", "/up/"))
            for listener, path in targets:  # warm-up: pools, caches, first-run code
                url = f"http://127.0.0.1:{ports[listener]}{path}"
                pb.run_wrk([], pb.wrk_argv(tools["wrk"], opts.connections, 2, url), 2)
            rows = []
            for listener, path in targets:
                url = f"http://127.0.0.1:{ports[listener]}{path}"
                subprocess.run([control, "-z", str(sidecar.popen.pid)], check=True, **_quiet())
                argv = pb.wrk_argv(tools["wrk"], opts.connections, opts.seconds, url)
                result = pb.parse_wrk(pb.run_wrk([], argv, opts.seconds))
                subprocess.run([control, "-d", str(sidecar.popen.pid)], check=True, **_quiet())
                dumps = sorted(work.glob("callgrind.*.out.*"), key=lambda p: p.stat().st_mtime)
                requests = result.requests
                if not requests or result.errors:
                    raise BenchError(f"{listener}: {requests} requests, {result.errors} errors")
                rows.append((listener, requests, callgrind_totals(dumps[-1]), dumps[-1]))
        finally:
            for server in servers.started:
                server.stop()
        build = "pure Python" if opts.pure else "compiled (mypyc)"
        print(f"# Instructions per proxied request, {build}\n")
        print(f"wrk -t1 -c{opts.connections} -d{opts.seconds}s, XID on every request\n")
        print("| listener | requests | instructions per request |")
        print("|---|--:|--:|")
        for listener, requests, total, _ in rows:
            print(f"| {listener} | {requests:,} | {total / requests:,.0f} |")
        for listener, requests, _, dump in rows if opts.top else ():
            print(f"\n## {listener}: functions by their own instructions per request\n")
            for name, cost in self_costs(dump).most_common(opts.top):
                print(f"- {cost / requests:7,.0f}  {name[:110]}")
    return 0


def _quiet() -> dict[str, int]:
    return {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pure", action="store_true", help="measure the pure-Python build")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--top", type=int, default=0)
    opts = parser.parse_args(argv)
    try:
        return measure(opts)
    except BenchError as exc:
        print("\n".join(str(a) for a in exc.args), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
