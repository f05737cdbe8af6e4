"""bench/idle_rss.py measures the example config itself: its rewrite moves only the listeners,
the app and upstream URLs and the journal, and the result is a valid config. No sidecar is
started here."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path
from typing import Any

import yaml

from sidecar import config as configmod

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "idle_rss.py"


def load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("idle_rss", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["idle_rss"] = module
    spec.loader.exec_module(module)
    return module


def _without(data: dict[str, Any]) -> dict[str, Any]:
    """The config minus what the bench is meant to move."""
    data = {**data, "listeners": dict(data["listeners"])}
    for name in ("inbound", "outbound", "api", "peer", "admin"):
        data["listeners"][name] = {k: v for k, v in data["listeners"][name].items() if k != "bind"}
    data["app"] = {k: v for k, v in data["app"].items() if k != "url"}
    data["upstreams"] = {
        name: {k: v for k, v in up.items() if k != "url"} for name, up in data["upstreams"].items()
    }
    data["local_coordinator"] = {
        k: v for k, v in data["local_coordinator"].items() if k != "journal"
    }
    return data


def test_config_rewrite_moves_only_ports_urls_and_journal(tmp_path: Path) -> None:
    bench = load_bench()
    path, ports = bench._config(tmp_path, 4242)
    example = yaml.safe_load((ROOT / "config" / "sidecar.yaml").read_text())
    rewritten = yaml.safe_load(path.read_text())

    assert set(ports) == {"inbound", "outbound", "api", "peer", "admin"}
    assert len(set(ports.values())) == 5
    for name, port in ports.items():
        assert rewritten["listeners"][name]["bind"] == f"127.0.0.1:{port}"
    assert rewritten["app"]["url"] == "http://127.0.0.1:4242"
    assert {up["url"] for up in rewritten["upstreams"].values()} == {"http://127.0.0.1:4242"}
    assert rewritten["local_coordinator"]["journal"] == f"sqlite:///{tmp_path}/journal.db"
    assert _without(rewritten) == _without(example)
    configmod.parse(rewritten, env={})  # valid as it stands


def test_listening_reads_proc_net_tcp(tmp_path: Path) -> None:
    """Readiness without a connection: a request before the idle reading would not be idle."""
    bench = load_bench()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert not bench._listening({"x": port})
        s.listen()
        assert bench._listening({"x": port})
