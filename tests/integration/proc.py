"""Run `gts-sidecar` as a real process: start it, learn its ports from its start-up log line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LISTENERS = {
    name: {"bind": "127.0.0.1:0"} for name in ("inbound", "outbound", "api", "peer", "admin")
}


@dataclass
class SidecarProcess:
    proc: asyncio.subprocess.Process
    ports: dict[str, int]
    log: list[dict[str, Any]] = field(default_factory=list)

    async def wait(self, timeout: float = 30.0) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    data: dict[str, Any] = {
        "listeners": LISTENERS,
        "logging": {"level": "info"},
        "local_coordinator": {"journal": f"sqlite:///{path.parent.resolve()}/journal.db"},
    }
    data.update(cfg)
    path.write_text(yaml.safe_dump(data))
    return path


async def spawn(
    config_path: Path,
    *extra: str,
    command: str = "run",
    prefix: Sequence[str] = (),
    started: str = "gts-sidecar started",
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
) -> tuple[SidecarProcess, dict[str, Any]]:
    """Start `python -m sidecar COMMAND --config FILE EXTRA…` (behind `prefix`, e.g. a fault
    injector); return the process (its stderr JSON lines pumped into .log) and the start-up
    record. A process that does not start in time is killed."""
    proc = await asyncio.create_subprocess_exec(
        *prefix, sys.executable, "-m", "sidecar", command, "--config", str(config_path), *extra,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )  # fmt: skip
    lines: list[dict[str, Any]] = []

    async def until_started() -> dict[str, Any]:
        assert proc.stderr is not None
        while True:
            raw = await proc.stderr.readline()
            if not raw:
                rc = await proc.wait()
                raise AssertionError(f"{command} exited with {rc} before starting: {lines}")
            try:
                rec = json.loads(raw)
            except ValueError:
                lines.append({"raw": raw.decode(errors="replace")})
                continue
            lines.append(rec)
            if rec.get("msg") == started:
                return dict(rec)

    try:
        rec = await asyncio.wait_for(until_started(), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    sp = SidecarProcess(proc, {k: int(v) for k, v in rec["ports"].items()}, lines)

    async def pump() -> None:
        assert proc.stderr is not None
        while raw := await proc.stderr.readline():
            try:
                sp.log.append(json.loads(raw))
            except ValueError:
                sp.log.append({"raw": raw.decode(errors="replace")})

    sp._pump = asyncio.get_running_loop().create_task(pump())  # type: ignore[attr-defined]
    return sp, rec


async def start_sidecar(config_path: Path, *extra: str, timeout: float = 30.0) -> SidecarProcess:
    sp, _ = await spawn(config_path, *extra, timeout=timeout)
    return sp
