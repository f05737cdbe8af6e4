"""`forward_headers` of TCC and Saga resources refuse credential headers at config load: a
phase-one credential replayed on phase two may have expired, and every retry then fails
(the endless compensation retries DTM users hit). phase_two_headers is the way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar import config
from sidecar.errors import ConfigError

EP = {"method": "POST", "path": "/x"}


def _tcc(headers: list[str]) -> dict[str, Any]:
    return {
        "tcc": [
            {"resource": "r", "try": EP, "confirm": EP, "cancel": EP, "forward_headers": headers}
        ]
    }


def _saga(headers: list[str]) -> dict[str, Any]:
    return {
        "saga": [{"resource": "s", "action": EP, "compensation": EP, "forward_headers": headers}]
    }


@pytest.mark.parametrize("build", [_tcc, _saga], ids=["tcc", "saga"])
@pytest.mark.parametrize(
    "header", ["Authorization", "authorization", "COOKIE", "Cookie", "Proxy-Authorization"]
)
def test_credential_headers_are_refused_with_the_way_out(build, header: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(build(["Content-Type", header]), env={})
    (problem,) = info.value.problems
    section = "tcc" if build is _tcc else "saga"
    assert problem.startswith(f"{section}[0].forward_headers: ")
    assert repr(header) in problem
    assert "phase_two_headers" in problem


@pytest.mark.parametrize("build", [_tcc, _saga], ids=["tcc", "saga"])
def test_other_headers_are_kept(build) -> None:
    cfg = config.parse(build(["Content-Type", "X-Tenant", "X-Authorization-Hint"]), env={})
    resource = (cfg.tcc or cfg.saga)[0]
    assert resource.forward_headers == ["Content-Type", "X-Tenant", "X-Authorization-Hint"]


def test_phase_two_headers_may_carry_authorization(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("Bearer phase-two\n")
    data = _tcc(["Content-Type"])
    data["tcc"][0]["phase_two_headers"] = [{"name": "Authorization", "value_file": str(token)}]
    cfg = config.parse(data, env={})
    assert cfg.tcc[0].phase_two_headers[0].value_file.reveal() == "Bearer phase-two"
