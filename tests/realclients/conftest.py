"""Real clients, built from source by the tests: Go's net/http (HTTP/1.1, and HTTP/2 over
TLS) and encoding/json (Debian's golang-go)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.component.conftest import upstream  # noqa: F401  (the apps the clients reach)
from tests.realclients.grpcapp import grpc_app  # noqa: F401

HERE = Path(__file__).parent


def build_go(tmp_path_factory: pytest.TempPathFactory, source: str) -> Path:
    """Compile tests/realclients/`source` (standard library only) and return the binary.
    Without Go the test skips, or fails under CI=true."""
    go = shutil.which("go")
    if go is None:
        message = "Go is not installed (scripts/system-deps.sh installs golang-go)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path_factory.mktemp("go") / Path(source).stem
    env = {**os.environ, "GO111MODULE": "off", "GOPROXY": "off", "GOFLAGS": "", "CGO_ENABLED": "0"}
    env.setdefault("GOCACHE", str(tmp_path_factory.getbasetemp() / "gocache"))
    subprocess.run(
        [go, "build", "-o", str(out), str(HERE / source)], check=True, env=env, timeout=300
    )
    return out


@pytest.fixture(scope="session")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Go net/http client as services use it (goclient.go)."""
    return build_go(tmp_path_factory, "goclient.go")


@pytest.fixture(scope="session")
def go_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Go program that decodes JSON into map[string]any (godecode.go)."""
    return build_go(tmp_path_factory, "godecode.go")


@pytest.fixture(scope="session")
def go_h2_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Go net/http client speaking HTTP/2 over TLS, several requests at once (goh2client.go)."""
    return build_go(tmp_path_factory, "goh2client.go")


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed (scripts/system-deps.sh installs {package})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def grpc_js_client() -> list[str]:
    """The command line of a real @grpc/grpc-js client (node/grpcclient.js); its package is
    installed from the npm registry at the version package-lock.json pins, once."""
    node = _need("node", "nodejs")
    npm = _need("npm", "npm")
    folder = HERE / "node"
    if not (folder / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=folder,
            check=True,
            timeout=600,
            stdout=subprocess.DEVNULL,
        )
    return [node, str(folder / "grpcclient.js")]


@pytest.fixture(scope="session")
def java_client(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The command line of JavaClient.java (java.net.http.HttpClient), compiled once."""
    javac = _need("javac", "default-jdk-headless")
    java = _need("java", "default-jdk-headless")
    out = tmp_path_factory.mktemp("java")
    subprocess.run([javac, "-d", str(out), str(HERE / "JavaClient.java")], check=True, timeout=300)
    return [java, "-cp", str(out), "JavaClient"]
