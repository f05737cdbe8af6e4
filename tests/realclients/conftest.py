"""Real clients, built from source by the tests: Go's net/http (HTTP/1.1, and HTTP/2 over
TLS) and encoding/json (Debian's golang-go)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.component.conftest import upstream  # noqa: F401  (the apps the clients reach)
from tests.realclients.grpcapp import channel, grpc_app  # noqa: F401 (fixtures)

HERE = Path(__file__).parent


def build_go(
    tmp_path_factory: pytest.TempPathFactory, source: str, gopath: str | None = None
) -> Path:
    """Compile tests/realclients/`source` (standard library only, or packages Debian installs
    under `gopath`) and return the binary. Without Go the test skips, or fails under
    CI=true."""
    go = shutil.which("go")
    if go is None:
        message = "Go is not installed (scripts/system-deps.sh installs golang-go)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path_factory.mktemp("go") / Path(source).stem
    env = {**os.environ, "GO111MODULE": "off", "GOPROXY": "off", "GOFLAGS": "", "CGO_ENABLED": "0"}
    env.setdefault("GOCACHE", str(tmp_path_factory.getbasetemp() / "gocache"))
    if gopath is not None:
        env["GOPATH"] = gopath
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


#: where Debian's golang-google-grpc-dev puts grpc-go and what it needs (GOPATH mode)
DEBIAN_GOPATH = "/usr/share/gocode"


def build_grpc_go(tmp_path_factory: pytest.TempPathFactory, source: str) -> Path:
    """`source` built against Debian's golang-google-grpc-dev; without it the test skips, or
    fails under CI=true."""
    if not Path(DEBIAN_GOPATH, "src/google.golang.org/grpc").is_dir():
        message = (
            "grpc-go is not installed (scripts/system-deps.sh installs golang-google-grpc-dev)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return build_go(tmp_path_factory, source, gopath=DEBIAN_GOPATH)


@pytest.fixture(scope="session")
def grpc_go_client(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The command line of a real grpc-go client (grpcgo.go), built against Debian's
    golang-google-grpc-dev."""
    return [str(build_grpc_go(tmp_path_factory, "grpcgo.go"))]


@pytest.fixture(params=["grpc-js", "grpc-go"])
def grpc_client(request: pytest.FixtureRequest) -> list[str]:
    """Each real gRPC client that is not grpcio: @grpc/grpc-js and grpc-go."""
    name = "grpc_js_client" if request.param == "grpc-js" else "grpc_go_client"
    client: list[str] = request.getfixturevalue(name)
    return client
