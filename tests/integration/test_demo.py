"""`gts-sidecar demo` as a user runs it: `python -m sidecar demo` in a subprocess, from the
checkout, with nothing but the package: the four phases, the checks, and the clean-up (at the
end, and on Ctrl-C)."""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PHASES = (
    "phase 1: a committed order",
    "phase 2: a failed order is cancelled",
    "phase 3: the coordinator is killed (SIGKILL): degraded mode",
    "phase 4: the coordinator is back: hand-back",
)
STAMP = r"^\[\s*\d+\.\d{3}s\] "


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "demo", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_the_demo_runs_four_phases_and_every_check_passes() -> None:
    result = demo()
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for phase in PHASES:
        assert f"== {phase} ==" in out
    assert re.search(STAMP + r"order #1: committed \(HTTP 201, xid 127\.0\.0\.1:", out, re.M)
    assert re.search(STAMP + r"order #2: failed: HTTP 409 .*insufficient balance", out, re.M)
    assert re.search(STAMP + r"inventory: the reservation was released", out, re.M)
    assert re.search(STAMP + r"coordinator: killed with SIGKILL", out, re.M)
    assert re.search(STAMP + r"order #3: committed .*owned by the order sidecar\)$", out, re.M)
    assert re.search(STAMP + r"hand-back: order #\d+'s XID names the coordinator again", out, re.M)
    checks = re.findall(r"^(PASS|FAIL)  ", out, re.M)
    assert checks and set(checks) == {"PASS"}, out
    assert re.search(rf"^all {len(checks)} checks passed \(run time \d+\.\d+s\)$", out, re.M)
    took = float(re.findall(r"run time (\d+\.\d+)s", out)[0])
    assert took < 20, out
    # the temp dir is gone and the coordinator process with it
    temp = re.search(r"demo: temp dir (\S+)", out)
    assert temp is not None and not Path(temp.group(1)).exists()
    for pid in re.findall(r"coordinator: (?:re)?started \(pid (\d+)\)", out):
        assert gone(int(pid))


def test_quiet_prints_only_the_summary_and_keep_keeps_the_temp_dir() -> None:
    result = demo("--quiet", "--keep")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert not re.search(STAMP, out, re.M)  # no timeline
    assert "== phase" not in out
    assert re.search(r"^all \d+ checks passed", out, re.M)
    kept = re.search(r"demo: kept the temp dir (\S+)", out)
    assert kept is not None, out
    temp = Path(kept.group(1))
    try:
        assert (temp / "coordinator.db").exists()
        assert (temp / "order-sidecar.db").exists()
        assert "gts-sidecar coordinator started" in (temp / "coordinator.log").read_text()
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_ctrl_c_mid_run_stops_everything_and_removes_the_temp_dir(tmp_path: Path) -> None:
    stderr = (tmp_path / "stderr").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "demo"],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + 60
            # interrupt once the services are up and the coordinator has started
            while not any("initial state:" in line for line in seen):
                assert time.monotonic() < deadline, seen
                if sel.select(timeout=1):
                    line = proc.stdout.readline()
                    assert line, f"the demo ended early: {seen}"
                    seen.append(line)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()
    out = "".join(seen) + rest
    assert proc.returncode == 130, out + (tmp_path / "stderr").read_text()
    assert "interrupted" in (tmp_path / "stderr").read_text()
    temp = re.search(r"demo: temp dir (\S+)", out)
    assert temp is not None and not Path(temp.group(1)).exists()
    pid = re.search(r"coordinator: started \(pid (\d+)\)", out)
    assert pid is not None and gone(int(pid.group(1)))
