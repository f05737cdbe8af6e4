"""What the bench scripts share: their error, argument types, child processes that die with
their parent, and the facts about the machine a report names.

Imported as `benchkit` (the scripts run as `python bench/NAME.py`, so bench/ is on sys.path).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import platform
import re
import signal
import subprocess
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """A failure worth one clear line (plus, maybe, a log tail), not a traceback."""

    def __init__(self, message: str, log_tail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.log_tail = log_tail

    def report(self, prefix: str = "!! ") -> None:
        print(f"{prefix}{self.message}", file=sys.stderr)
        if self.log_tail:
            print(self.log_tail, file=sys.stderr)


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_seconds(text: str) -> float:
    """An argparse type: `10`, `10s`, `500ms`, `5m`, `1h` → seconds (positive)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (e.g. 10, 10s, 500ms, 5m)")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if value <= 0:
        raise argparse.ArgumentTypeError("the duration must be positive")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def die_with_parent() -> None:
    """In a child (preexec_fn): get SIGKILL if the benchmark itself dies (Linux prctl)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def venv_python() -> str:
    candidate = REPO_DIR / ".venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def command_output(argv: list[str]) -> str:
    """The first line a command prints, for a report ("unknown" if it cannot run)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].strip() if lines and done.returncode == 0 else "?"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"
