"""bench/request_instructions.py reads callgrind's output format: a function's own cost is the
cost lines under its `fn=`, not the inclusive costs that follow each `calls=` line, and names
given once as `(id) name` are reused by id. No valgrind needed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[2] / "bench" / "request_instructions.py"

CALLGRIND = """\
version: 1
creator: callgrind-3.19.0
events: Ir
fn=(1) parent
10 100
cfn=(2) child
calls=3 20
20 5000
11 50
fn=(2)
30 700
fn=(3) other
40 7
summary: 857
totals: 857
"""


def load() -> Any:
    if str(BENCH.parent) not in sys.path:  # as when run as a script: bench/ holds benchkit
        sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("request_instructions", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_own_costs_leave_out_what_callees_cost(tmp_path: Path) -> None:
    ri = load()
    dump = tmp_path / "callgrind.out.1"
    dump.write_text(CALLGRIND)
    assert ri.self_costs(dump) == {"parent": 150, "child": 700, "other": 7}
    assert ri.callgrind_totals(dump) == 857
