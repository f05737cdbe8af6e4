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
