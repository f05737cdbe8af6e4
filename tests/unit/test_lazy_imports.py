"""A config loads only the libraries it uses: each one the example config does not need costs
the idle sidecar RSS (redis-py with aiocache and OpenTelemetry ~9 MB, PyJWT with
`cryptography` ~11 MB, h2 ~1 MB, asyncpg), and pydantic, which no config needs any more (9 MiB:
the config is validated by sidecar/schema.py). Checked in a fresh interpreter's sys.modules,
since this test process has imported everything already."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "sidecar.yaml"

#: top-level packages the example config never needs, and which config needs each
NOT_NEEDED = {
    "redis": "idempotency.store or locks.backend redis://",
    "aiocache": "idempotency.store redis://",
    "opentelemetry": "imported by redis-py",
    "jwt": "coordinator.auth (token_url, verify_key_file)",
    "cryptography": "imported by PyJWT",
    "asyncpg": "local_coordinator.journal postgresql://",
    "h2": "a client speaking HTTP/2, or an h2c app or upstream",
    "hpack": "imported by h2",
    # no config needs it: sidecar/schema.py validates the config (pydantic held 9 MiB a pod)
    "pydantic": "nothing (not a dependency)",
    "pydantic_core": "nothing (not a dependency)",
    "hypothesis": "tests only",
    "pytest": "tests only",
    "trustme": "tests only",
    "grpc": "tests only",
}

# Starts a Sidecar from the example config (ephemeral loopback ports, the journal in a temp
# dir, `overrides` merged over it) on uvloop as `gts-sidecar run` does, and prints the
# top-level packages loaded once it is up.
_SCRIPT = """
import asyncio, json, sys
import uvloop, yaml
from sidecar import config as configmod
from sidecar.metrics import Metrics
from sidecar.server import Sidecar

example, journal, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
with open(example) as f:
    data = yaml.safe_load(f)
for listener in ("inbound", "outbound", "api", "peer", "admin"):
    data["listeners"][listener]["bind"] = "127.0.0.1:0"
data["local_coordinator"]["journal"] = "sqlite:///" + journal
for section, values in overrides.items():
    data[section].update(values)
config = configmod.parse(data, env={})

async def main():
    sidecar = Sidecar(config, metrics=Metrics())
    await sidecar.start()
    try:
        assert sidecar.ports["admin"] > 0
        print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
    finally:
        await sidecar.close()

uvloop.run(main())
"""


# The same sidecar, then in service: an app and the `inventory` upstream answer on loopback,
# and one request goes to every listener, as in production from the first second on
# (inbound and outbound proxied, a transaction begun and committed on the api listener, an
# unsigned peer call, the kubelet's /healthz and /readyz, a /metrics scrape). A library that
# one of these loads lazily would cost the idle sidecar just the same. Requests are written as
# raw HTTP/1.1 on asyncio streams, so the script itself loads nothing the sidecar would not.
_SERVING_SCRIPT = """
import asyncio, json, sys
import uvloop, yaml
from sidecar import config as configmod
from sidecar.metrics import Metrics
from sidecar.server import Sidecar

example, journal = sys.argv[1], sys.argv[2]

async def app(reader, writer):
    try:
        while await reader.readuntil(b"\\r\\n\\r\\n"):
            writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 3\\r\\n\\r\\nok\\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()  # the sidecar closed it (pool, or the readiness probe's connect)

async def call(port, method, path, body=b""):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"{method} {path} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n"
    head += f"Content-Type: application/json\\r\\nContent-Length: {len(body)}\\r\\n\\r\\n"
    writer.write(head.encode() + body)
    response = await reader.read()
    writer.close()
    status = int(response.split(b" ", 2)[1])
    return status, response.partition(b"\\r\\n\\r\\n")[2]

async def main():
    server = await asyncio.start_server(app, "127.0.0.1", 0)
    app_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    with open(example) as f:
        data = yaml.safe_load(f)
    for listener in ("inbound", "outbound", "api", "peer", "admin"):
        data["listeners"][listener]["bind"] = "127.0.0.1:0"
    data["local_coordinator"]["journal"] = "sqlite:///" + journal
    data["app"]["url"] = app_url
    data["upstreams"]["inventory"]["url"] = app_url
    sidecar = Sidecar(configmod.parse(data, env={}), metrics=Metrics())
    await sidecar.start()
    try:
        ports = sidecar.ports
        statuses = {}
        statuses["inbound"], _ = await call(ports["inbound"], "GET", "/")
        statuses["outbound"], _ = await call(ports["outbound"], "GET", "/inventory/x")
        status, body = await call(ports["api"], "POST", "/v1/transactions", b'{"name": "t"}')
        xid = json.loads(body)["xid"]
        statuses["api"], _ = await call(ports["api"], "POST", f"/v1/transactions/{xid}/commit")
        statuses["peer"], _ = await call(ports["peer"], "GET", "/api/v1/transaction/x")
        for path in ("/healthz", "/readyz", "/metrics"):
            statuses[path], _ = await call(ports["admin"], "GET", path)
        loaded = sorted({name.split(".")[0] for name in sys.modules})
        print(json.dumps({"statuses": statuses, "loaded": loaded}))
    finally:
        await sidecar.close()
        server.close()

uvloop.run(main())
"""


def _loaded_after_start(tmp_path: Path, overrides: dict[str, Any] | None = None) -> set[str]:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _SCRIPT,
            str(EXAMPLE),
            str(tmp_path / "journal.db"),
            json.dumps(overrides or {}),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.splitlines()[-1]))


def _loaded_by_import(module: str, cwd: Path) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=cwd
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return {name.split(".")[0] for name in json.loads(out.stdout)}


@pytest.mark.parametrize(
    "module", ["sidecar.server", "sidecar.cli", "sidecar.control", "sidecar.injector_server"]
)
def test_import_loads_no_optional_library(module: str, tmp_path: Path) -> None:
    loaded = _loaded_by_import(module, tmp_path)
    unwanted = {name: why for name, why in NOT_NEEDED.items() if name in loaded}
    assert not unwanted, f"`import {module}` loads libraries only some configs need: {unwanted}"


def test_example_config_starts_without_optional_libraries(tmp_path: Path) -> None:
    loaded = _loaded_after_start(tmp_path)
    assert {"sidecar", "aiohttp", "httptools", "sqlite3"} <= loaded  # it did start
    unwanted = {name: why for name, why in NOT_NEEDED.items() if name in loaded}
    assert not unwanted, f"the example config loads libraries it does not use: {unwanted}"


def test_example_config_in_service_loads_no_optional_library(tmp_path: Path) -> None:
    """Lazy imports save memory only if serving does not load the libraries anyway: after a
    request on every listener and the probes, none of them is loaded either."""
    out = subprocess.run(
        [sys.executable, "-c", _SERVING_SCRIPT, str(EXAMPLE), str(tmp_path / "journal.db")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    # every request was served: the checks below are about a sidecar that did its work
    assert result["statuses"] == {
        "inbound": 200,
        "outbound": 200,
        "api": 200,
        "peer": 401,  # unsigned: refused, after the peer listener parsed it
        "/healthz": 200,
        "/readyz": 200,
        "/metrics": 200,
    }
    loaded = set(result["loaded"])
    unwanted = {name: why for name, why in NOT_NEEDED.items() if name in loaded}
    assert not unwanted, f"serving the example config loads libraries it does not use: {unwanted}"


def test_redis_store_loads_redis(tmp_path: Path) -> None:
    """The other side: a config that names Redis does load it (nothing is connected before
    the first call, so no server is needed to start)."""
    loaded = _loaded_after_start(
        tmp_path,
        {"idempotency": {"store": "redis://127.0.0.1:1/0"}},
    )
    assert {"redis", "aiocache"} <= loaded
    assert "jwt" not in loaded


def test_h2c_upstream_loads_h2(tmp_path: Path) -> None:
    loaded = _loaded_after_start(tmp_path, {"app": {"protocol": "h2c"}})
    assert {"h2", "hpack"} <= loaded
