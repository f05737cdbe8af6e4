"""The command line as a user types it: check-config takes FILE or --config FILE, every
subcommand takes --log-level, problem counts read as English; `gts-sidecar injector` runs as
a real process (HTTPS, SIGTERM → exit 0)."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import trustme
import yaml

from sidecar import logs
from sidecar.cli import build_parser

from .proc import spawn

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_check_config_takes_the_file_either_way() -> None:
    for args in (
        ["config/sidecar.yaml"],
        ["--config", "config/sidecar.yaml"],
        ["config/sidecar.yaml", "--config", "config/sidecar.yaml"],
    ):
        result = cli("check-config", *args)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "config/sidecar.yaml: ok\n"
    result = cli("check-config")
    assert result.returncode == 2 and "the config file is required" in result.stderr
    result = cli("check-config", "a.yaml", "--config", "b.yaml")
    assert result.returncode == 2 and "give the config file once" in result.stderr


def test_problem_counts_read_as_english(tmp_path: Path) -> None:
    one = tmp_path / "one.yaml"
    one.write_text("drain_timeout: 30\n")
    result = cli("check-config", "--config", str(one))
    assert result.returncode == 2
    assert f"{one}: invalid config (1 problem):" in result.stderr
    two = tmp_path / "two.yaml"
    two.write_text("drain_timeout: 30\nlistners: {}\n")
    result = cli("check-config", str(two))
    assert f"{two}: invalid config (2 problems):" in result.stderr
    assert "problem(s)" not in result.stderr


def test_check_config_validates_the_injector_example() -> None:
    result = cli("check-config", "--injector", "--config", "config/injector.yaml")
    assert result.returncode == 0, result.stderr
    # a sidecar config is not an injector config, and the other way round
    result = cli("check-config", "--injector", "config/sidecar.yaml")
    assert result.returncode == 2 and "listeners: unknown key" in result.stderr
    result = cli("check-config", "config/injector.yaml")
    assert result.returncode == 2 and "inject: unknown key" in result.stderr


@pytest.mark.parametrize("command", ["run", "check-config", "coordinator", "injector", "demo"])
def test_every_subcommand_takes_log_level(command: str) -> None:
    parser = build_parser()
    extra = {"run": ["--config", "f"], "coordinator": ["--config", "f"]}
    extra |= {"injector": ["--config", "f"], "check-config": ["f"]}
    args = parser.parse_args([command, *extra.get(command, []), "--log-level", "debug"])
    assert args.log_level == "debug"
    with pytest.raises(SystemExit):
        parser.parse_args([command, *extra.get(command, []), "--log-level", "loud"])


def test_log_level_wins_over_the_config_on_reloads_too() -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        logs.setup("info", "json", override="debug")
        assert root.level == logging.DEBUG
        logs.set_level("warning")  # what a config reload does
        assert root.level == logging.DEBUG
        logs.setup("info", "json")
        logs.set_level("warning")
        assert root.level == logging.WARNING
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


def _injector_config(tmp_path: Path, ca: trustme.CA) -> Path:
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    data = yaml.safe_load((ROOT / "config" / "injector.yaml").read_text())
    data["listen"] = {"bind": "127.0.0.1:0", "tls": {"cert_file": str(cert), "key_file": str(key)}}
    path = tmp_path / "injector.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def test_injector_process_serves_https_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    ca = trustme.CA()
    path = _injector_config(tmp_path, ca)
    proc, started = await spawn(
        path, "--log-level", "debug", command="injector", started="gts-sidecar injector started"
    )
    try:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        async with aiohttp.ClientSession() as s:
            url = f"https://127.0.0.1:{proc.ports['https']}/healthz"
            async with s.get(url, ssl=ctx) as resp:
                assert resp.status == 200
                assert (await resp.json())["status"] == "ok"
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0
        await asyncio.wait_for(proc._pump, 10)  # type: ignore[attr-defined]  # stderr's end
        assert any(rec.get("msg") == "stopped" for rec in proc.log)
    finally:
        await proc.stop()


def test_injector_without_its_certificate_exits_2(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "config" / "injector.yaml").read_text())
    data["listen"]["tls"] = {"cert_file": str(tmp_path / "no.crt"), "key_file": "no.key"}
    path = tmp_path / "injector.yaml"
    path.write_text(yaml.safe_dump(data))
    result = cli("injector", "--config", str(path))
    assert result.returncode == 2
    assert "listen.tls: cannot load the certificate and key" in result.stderr
