"""bench/proxy_bench.py's report on made-up runs: interleaved rounds give median (min–max),
ratios are taken within a round, CPU per request is split into user and system, and RSS
(idle and under load) is shown per target. No wrk or nginx needed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[2] / "bench" / "proxy_bench.py"


def load_bench() -> Any:
    if str(BENCH.parent) not in sys.path:  # as when run as a script: bench/ holds benchkit
        sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("proxy_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["proxy_bench"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


pb = load_bench()


def wrk(rps: float, p50_us: float = 1000.0) -> Any:
    return pb.WrkResult(rps, p50_us, 3 * p50_us, int(rps * 10), 0, 0, "raw")


def target(name: str, rps: list[float], cpu: list[tuple[float, float]], c1_p50: list[float]) -> Any:
    t = pb.Target(name, 1)
    t.results = {50: [wrk(r) for r in rps], 1: [wrk(100.0, p) for p in c1_p50]}
    t.cpu_us = {50: cpu}
    t.rss_idle_kib = 40 * 1024
    t.rss_load_kib = [41 * 1024, 45 * 1024, 43 * 1024]
    return t


def test_spread() -> None:
    one = "{:.1f}".format
    assert pb.spread([], one) == "n/a"
    assert pb.spread([2.0], one) == "2.0"
    assert pb.spread([3.0, 1.0, 2.0], one) == "2.0 (1.0–3.0)"
    assert pb.spread([1.0, 1.0], one) == "1.0"  # no range when there is none


def test_rounds_table() -> None:
    targets = [
        target("direct", [100.0, 100.0, 100.0], [(1, 5)] * 3, [40.0, 40.0, 50.0]),
        target("nginx-proxy", [40.0, 20.0, 40.0], [(2, 10), (3, 10), (2, 10)], [60.0] * 3),
        # 0.5x of its nginx in every round, although its rps alone moved 10 -> 20
        target("sidecar-inbound", [20.0, 10.0, 20.0], [(14, 10), (15, 9), (14, 12)], [80.0] * 3),
    ]
    rows = pb.results_table(targets, 50)
    assert rows[0].count("|") == rows[1].count("|") == 11
    cells = {r.split(" | ")[0].strip("| "): r.strip("|").split(" | ") for r in rows[2:]}
    sidecar = [c.strip() for c in cells["sidecar-inbound"]]
    assert sidecar[1] == "20 (10–20)"  # rps
    assert sidecar[2] == "0.50×"  # the ratio within each round, the same in all three
    assert sidecar[5] == "+40 (+30–+40)"  # p50 added over direct, round by round
    assert sidecar[6] == "24.0 (24.0–26.0) = 14.0 + 10.0"  # CPU total, then user + sys
    assert sidecar[7] == "0.50× (0.46×–0.54×)"  # 12/24, 13/24, 12/26: within each round
    assert sidecar[8] == "40.0"  # idle RSS, MiB
    assert sidecar[9] == "43.0 (41.0–45.0)"  # peak under load per round


def test_failed_target_row_has_every_column() -> None:
    t = pb.Target("sidecar-outbound", 1, failure="did not start")
    rows = pb.results_table([t], 50)
    assert rows[2].count("|") == rows[0].count("|")
    assert "FAILED" in rows[2]


def test_rounds_option() -> None:
    opts = pb.parse_args(["--rounds", "3", "--quick", "--sidecar-cmd", "x"])
    assert opts.rounds == 3 and opts.duration_s == 3
    assert pb.parse_args(["--sidecar-cmd", "x"]).rounds == 1


# --- the HTTP/2 rows (h2load against nghttpx-h2c and the sidecars' inbound listeners) -------

H2LOAD_OUTPUT = """\
starting benchmark...
Application protocol: h2c

finished in 3.00s, 1200.50 req/s, 1.52MB/s
requests: 3700 total, 3764 started, 3700 done, 3690 succeeded, 10 failed, 10 errored, 0 timeout
status codes: 3680 2xx, 0 3xx, 0 4xx, 10 5xx
traffic: 3.03MB (3180210) total, 931.91KB (954273) headers (space savings 91.59%)
"""


def test_parse_h2load_counts_and_percentiles() -> None:
    latencies = list(range(1, 101))  # µs, from h2load's per-request log
    r = pb.parse_h2load(H2LOAD_OUTPUT, latencies)
    assert r.rps == 1200.5
    assert r.requests == 3700  # done: what CPU per request divides by
    assert r.non_2xx == 20  # 3,700 done, 3,680 of them 2xx
    assert r.socket_errors == 10  # failed
    assert (r.p50_us, r.p99_us) == (51.0, 100.0)
    assert r.errors == 30


def test_parse_h2load_without_a_summary_or_a_log_is_an_error() -> None:
    for text, log in (("h2load: connect refused\n", [5]), (H2LOAD_OUTPUT, [])):
        try:
            pb.parse_h2load(text, log)
        except pb.BenchError:
            continue
        raise AssertionError(f"no BenchError for {text!r} with {log}")


def test_h2load_argv_prior_knowledge_with_the_xid() -> None:
    argv = pb.h2load_argv("h2load", 4, 16, 3, "http://127.0.0.1:1/", "/tmp/log")
    assert argv[:5] == ["h2load", "-t1", "-c4", "-m16", "-D3"]
    assert "--log-file=/tmp/log" in argv
    assert argv[argv.index("-H") + 1] == "xid: 127.0.0.1:8091:123456789"  # lower case in h2
    assert argv[-1] == "http://127.0.0.1:1/"  # http:// = h2c with prior knowledge


def h2_target(name: str, rps: list[float], cpu: list[tuple[float, float]]) -> Any:
    t = pb.Target(name, 1, h2=True)
    t.results = {50: [wrk(r) for r in rps]}  # the throughput set only
    t.cpu_us = {50: cpu}
    t.rss_idle_kib = 40 * 1024
    return t


def test_h2_rows_are_against_nghttpx() -> None:
    targets = [
        target("direct", [100.0, 100.0], [(1, 5)] * 2, [40.0, 40.0]),
        target("nginx-proxy", [40.0, 40.0], [(2, 10)] * 2, [60.0] * 2),
        h2_target("nghttpx-h2c", [200.0, 100.0], [(3, 6), (3, 6)]),
        # a quarter of nghttpx in each round, although nginx-proxy's rps is far below
        h2_target("sidecar-inbound-h2c", [50.0, 25.0], [(30, 6), (32, 4)]),
        h2_target("sidecar-inbound-h2c-compiled", [100.0, 50.0], [(12, 6), (12, 6)]),
    ]
    rows = pb.results_table(targets, 50)
    cells = {
        r.split(" | ")[0].strip("| "): [c.strip() for c in r.strip("|").split(" | ")]
        for r in rows[2:]
    }
    assert cells["nghttpx-h2c"][2] == "1.00×"
    assert cells["sidecar-inbound-h2c"][2] == "0.25×"
    assert cells["sidecar-inbound-h2c-compiled"][2] == "0.50×"
    assert cells["sidecar-inbound-h2c"][6] == "36.0 = 31.0 + 5.0"
    assert cells["sidecar-inbound-h2c"][7] == "0.25×"  # nghttpx's 9 µs / its 36 µs
    assert cells["sidecar-inbound-h2c-compiled"][7] == "0.50×"
    assert cells["sidecar-inbound-h2c"][5] == "n/a"  # no latency set: wrk's column
    assert all(row.count("|") == rows[0].count("|") for row in rows)


def test_h2_targets_are_loaded_once_per_round(monkeypatch: Any) -> None:
    """The HTTP/2 targets run in the throughput set only, in the same round order."""
    runs: list[tuple[str, int]] = []
    monkeypatch.setattr(pb, "IDLE_SETTLE_S", 0.0)
    monkeypatch.setattr(pb, "measure_one", lambda t, c, *rest: runs.append((t.name, c)))
    targets = [pb.Target("nginx-proxy", 1), pb.Target("nghttpx-h2c", 2, h2=True)]
    opts = pb.parse_args(["--rounds", "2", "--sidecar-cmd", "x"])
    pb.measure(targets, opts, {}, [], Path("/nonexistent"))
    round_runs = [("nginx-proxy", 50), ("nghttpx-h2c", 50), ("nginx-proxy", 1)]
    assert runs == round_runs * 2


def test_default_targets_include_h2_and_leave_them_out_without_tools(monkeypatch: Any) -> None:
    def no_tools() -> dict[str, str]:
        raise pb.BenchError("missing nghttp2-client nghttp2-proxy; as root run: apt-get ...")

    monkeypatch.setattr(pb, "ensure_h2_tools", no_tools)
    default = pb.parse_args(["--sidecar-cmd", "x"])
    assert set(pb.H2_TARGETS) <= set(default.targets) and not default.targets_explicit
    opts, problem, note = pb.h2_tools_or_leave_out(default, {})
    assert problem is None and note is not None and "left out" in note
    assert not set(pb.H2_TARGETS) & set(opts.targets)
    assert "sidecar-inbound" in opts.targets  # the rest is measured
    report = pb.render_report([], opts, [], "wrk", note)
    assert "Problems:" in report and "left out" in report

    # named in --targets, they stay and fail with the reason
    named = pb.parse_args(["--targets", "nginx-proxy,nghttpx-h2c", "--sidecar-cmd", "x"])
    opts, problem, note = pb.h2_tools_or_leave_out(named, {})
    assert opts.targets == ("nginx-proxy", "nghttpx-h2c") and note is None
    assert problem is not None and "nghttp2-client" in problem

    # no HTTP/2 target asked for: the tools are not even looked for
    plain = pb.parse_args(["--targets", "nginx-proxy", "--sidecar-cmd", "x"])
    assert pb.h2_tools_or_leave_out(plain, {}) == (plain, None, None)


def test_report_describes_the_h2_load() -> None:
    opts = pb.parse_args(
        ["--quick", "--h2-connections", "2", "--h2-streams", "8", "--sidecar-cmd", "x"]
    )
    t = h2_target("sidecar-inbound-h2c", [50.0], [(30, 6)])
    t.results[50] = [pb.WrkResult(50.0, 1.0, 2.0, 150, 3, 0, "raw")]
    report = pb.render_report([t], opts, [], "wrk", None, "/usr/bin/h2load")
    assert "`-t1 -c2 -m8`" in report
    assert "h2load -t1 -c2 -m8 -D3 --log-file=LOG" in report
    assert "sidecar-inbound-h2c** h2load -c2 -m8 round 1: 3 non-2xx" in report
