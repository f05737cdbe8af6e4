"""Which reloaded changes apply live and which need a restart (reload.restart_needed):
rotated secret values apply live where the running process re-reads them (signing keys, the
JWT keys, phase-two header values), and need a restart where a client keeps them (Redis)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sidecar import config
from sidecar.reload import restart_needed, watched_files
from sidecar.schema import replace, validate

EP = {"method": "POST", "path": "/x"}


def _secret(path: Path, value: str) -> str:
    path.write_text(value + "\n")
    return str(path)


def _config(tmp_path: Path, **values: str) -> config.Config:
    """A config whose secrets hold `values` (same paths every time)."""
    files = {k: _secret(tmp_path / k, v) for k, v in values.items()}
    data: dict[str, Any] = {
        "coordinator": {"signing": {"key_id": "k1", "secret_file": files["signing"]}},
        "admin": {"token_file": files["admin"]},
        "idempotency": {"password_file": files["redis"]},
        "tcc": [
            {
                "resource": "r",
                "try": EP,
                "confirm": EP,
                "cancel": EP,
                "phase_two_headers": [{"name": "Authorization", "value_file": files["p2"]}],
            }
        ],
    }
    return config.parse(data, env={})


def test_secret_values_that_apply_live_need_no_restart(tmp_path: Path) -> None:
    old = _config(tmp_path, signing="s1", admin="a1", redis="r1", p2="Bearer 1")
    new = _config(tmp_path, signing="s2", admin="a2", redis="r1", p2="Bearer 2")
    assert old != new
    assert restart_needed(old, new) == []


def test_a_redis_password_change_needs_a_restart(tmp_path: Path) -> None:
    old = _config(tmp_path, signing="s1", admin="a1", redis="r1", p2="Bearer 1")
    new = _config(tmp_path, signing="s1", admin="a1", redis="r2", p2="Bearer 1")
    assert restart_needed(old, new) == ["idempotency: changing this section needs a restart"]


def test_signing_rotation_is_live_other_coordinator_keys_are_not(tmp_path: Path) -> None:
    old = _config(tmp_path, signing="s1", admin="a1", redis="r1", p2="Bearer 1")
    rotated = replace(
        old,
        coordinator=replace(
            old.coordinator,
            signing=validate(
                config.SigningConfig,
                {
                    "key_id": "k2",
                    "secret_file": _secret(tmp_path / "k2", "s2"),
                    "previous": [{"key_id": "k1", "secret_file": str(tmp_path / "signing")}],
                },
            ),
        ),
    )
    assert restart_needed(old, rotated) == []
    slower = replace(
        old,
        coordinator=replace(old.coordinator, timeouts=config.CoordinatorTimeouts(request="2s")),
    )
    assert restart_needed(old, slower) == [
        "coordinator: changing this section (except signing, tls) needs a restart"
    ]


def test_every_named_file_is_watched(tmp_path: Path) -> None:
    cfg = _config(tmp_path, signing="s1", admin="a1", redis="r1", p2="Bearer 1")
    assert watched_files(cfg) == sorted(
        str(tmp_path / name) for name in ("signing", "admin", "redis", "p2")
    )
    tls = config.parse(
        {"listeners": {"inbound": {"tls": {"cert_file": "/c.pem", "key_file": "/k.pem"}}},
         "upstreams": {"u": {"url": "https://u", "tls": {"ca_file": "/ca.pem"}}}},
        env={},
    )  # fmt: skip
    assert watched_files(tls) == ["/c.pem", "/ca.pem", "/k.pem"]
