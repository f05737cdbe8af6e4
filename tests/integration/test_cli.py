"""`gts-sidecar check-config` and the start-up refusals, as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )


def test_example_config_is_valid() -> None:
    result = cli("check-config", "config/sidecar.yaml")
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_invalid_config_lists_every_problem_with_its_key_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "upstreams:\n"
        "  orders:\n"
        "    url: http://orders:8080\n"
        "    timeouts: {total: soon}\n"
        "  billing:\n"
        "    url: ftp://billing\n"
        "app: {url: http://127.0.0.1:8080, timeouts: {response_header: 20s, total: 10s}}\n"
        "drain_timeout: 30\n"
        "listners: {}\n"
    )
    result = cli("check-config", str(bad))
    assert result.returncode == 2
    err = result.stderr
    assert "upstreams.orders.timeouts.total: invalid duration 'soon'" in err
    assert "upstreams.billing.url:" in err
    assert "app: timeouts.total (10s) must exceed timeouts.response_header (20s)" in err
    assert "drain_timeout: invalid duration 30" in err
    assert "listners: unknown key" in err


def test_missing_file_and_bad_yaml_are_clear(tmp_path: Path) -> None:
    result = cli("check-config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("app:\n  url: [unclosed\n")
    result = cli("check-config", str(broken))
    assert result.returncode == 2
    assert "invalid YAML at line" in result.stderr


def test_run_refuses_an_invalid_config_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("xid: {max_length: 3}\n")
    result = cli("run", "--config", str(bad))
    assert result.returncode == 2
    assert "xid.max_length" in result.stderr


def test_refuses_to_start_on_the_pure_python_http_parser(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "listeners:\n"
        + "".join(
            f"  {n}: {{bind: '127.0.0.1:0'}}\n"
            for n in ("inbound", "outbound", "api", "peer", "admin")
        )
    )
    import os

    env = {**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"}
    result = cli("run", "--config", str(cfg), env=env)
    assert result.returncode == 2
    assert "pure-Python HTTP parser" in result.stderr
    assert "listeners.require_c_parser" in result.stderr
