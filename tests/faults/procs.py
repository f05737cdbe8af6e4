"""Real sidecar and coordinator processes for the fault suite (started by
tests/integration/proc.py's `spawn`, with a command prefix or environment where a fault
injector needs one)."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.integration.proc import LISTENERS, SidecarProcess, spawn

SECRET = "faults-suite-signing-secret-0123456789"


def key_file(tmp: Path) -> Path:
    path = tmp / "signing.key"
    path.write_text(SECRET + "\n")
    return path


def signing(tmp: Path, **extra: Any) -> dict[str, Any]:
    return {"key_id": "k1", "secret_file": str(key_file(tmp)), **extra}


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    data: dict[str, Any] = {
        "listeners": LISTENERS,
        "logging": {"level": "info"},
        "drain_timeout": "2s",
        "local_coordinator": {"journal": f"sqlite:///{path.parent.resolve()}/journal.db"},
    }
    data.update(cfg)
    path.write_text(yaml.safe_dump(data))
    return path


async def start_sidecar(
    config_path: Path, *, prefix: Sequence[str] = (), env: dict[str, str] | None = None
) -> SidecarProcess:
    sp, _ = await spawn(config_path, prefix=prefix, env=env)
    return sp


class Coordinator:
    """`python -m sidecar coordinator` on a fixed (or ephemeral) peer port; restartable."""

    def __init__(
        self,
        tmp: Path,
        *,
        peer_port: int = 0,
        window: str | None = None,
        advertise: str = "127.0.0.1",
        prefix: Sequence[str] = (),
        **local: Any,
    ) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.path = tmp / "coordinator.yaml"
        sign = signing(tmp, **({"window": window} if window else {}))
        self.data: dict[str, Any] = {
            "node": {"advertise_address": advertise},
            "listeners": {**LISTENERS, "peer": {"bind": f"127.0.0.1:{peer_port}"}},
            "logging": {"level": "info"},
            "drain_timeout": "2s",
            "coordinator": {"signing": sign},
            "local_coordinator": {"journal": f"sqlite:///{tmp.resolve()}/coordinator.db", **local},
        }
        self.path.write_text(yaml.safe_dump(self.data))
        self.prefix = prefix
        self.sp: SidecarProcess | None = None
        self.ports: dict[str, int] = {}
        self.resumed = 0

    async def start(self) -> Coordinator:
        self.sp, rec = await spawn(
            self.path, command="coordinator", prefix=self.prefix,
            started="gts-sidecar coordinator started",
        )  # fmt: skip
        self.ports = self.sp.ports
        # a restart binds the same peer port (the XIDs it issued name it)
        self.data["listeners"]["peer"] = {"bind": f"127.0.0.1:{self.ports['peer']}"}
        self.path.write_text(yaml.safe_dump(self.data))
        self.resumed = int(rec.get("resumed", 0))
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['peer']}"

    async def kill(self, sig: int = signal.SIGKILL) -> int | None:
        if self.sp is None or self.sp.proc.returncode is not None:
            return None if self.sp is None else self.sp.proc.returncode
        self.sp.signal(sig)
        return await self.sp.wait(30)

    async def stop(self) -> None:
        if self.sp is not None:
            await self.sp.stop()
