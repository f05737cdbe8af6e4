"""Real clients, built from source by the tests: Go's net/http (Debian's golang-go)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The path of a compiled tests/realclients/goclient.go."""
    go = shutil.which("go")
    if go is None:
        message = "Go is not installed (scripts/system-deps.sh installs golang-go)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path_factory.mktemp("go") / "goclient"
    env = {**os.environ, "GO111MODULE": "off", "GOPROXY": "off", "GOFLAGS": "", "CGO_ENABLED": "0"}
    env.setdefault("GOCACHE", str(tmp_path_factory.getbasetemp() / "gocache"))
    subprocess.run(
        [go, "build", "-o", str(out), str(HERE / "goclient.go")],
        check=True,
        env=env,
        timeout=300,
    )
    return out
