"""Java's java.net.http.HttpClient through the inbound listener, as a Java service calls
another: the default client, whose default version is HTTP/2. On a plain-text URL its first
request on a connection offers an upgrade (`Upgrade: h2c`, with the body); the sidecar must
serve it in HTTP/1.1 (before this was fixed, every such call got 501), deliver the body,
and serve the next request on the same connection.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.component.servers import Received, Reply, UpstreamFactory
from tests.component.test_abandon import ORDERS, PATIENT
from tests.component.tlsfiles import Pki


async def java(client: list[str], *args: str) -> list[list[str]]:
    proc = await asyncio.create_subprocess_exec(*client, *args, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, out
    return [line.split(" ", 5) for line in out.decode().splitlines()]


async def test_a_java_post_offering_http2_is_served_with_its_body(
    sidecar_factory: Any, upstream: UpstreamFactory, java_client: list[str]
) -> None:
    async def echo(req: Received, reply: Reply) -> None:
        await reply.send(200, b"got:" + req.body)

    app = await upstream(echo)
    sc = await sidecar_factory({"app": {"url": app.url}})
    url = f"http://127.0.0.1:{sc.ports['inbound']}/items"
    lines = await java(java_client, "POST", url, '{"sku":"A-1"}')
    assert lines == [["STATUS", "200", "HTTP_1_1", "-", "-", 'got:{"sku":"A-1"}']] * 2
    assert [r.body for r in app.requests] == [b'{"sku":"A-1"}'] * 2
    assert all(not {"upgrade", "http2-settings"} & r.names() for r in app.requests)


async def test_a_java_order_is_committed_each_time(
    sidecar_factory: Any, upstream: UpstreamFactory, java_client: list[str]
) -> None:
    async def created(req: Received, reply: Reply) -> None:
        await reply.send(201, b'{"id":"1"}', [("Content-Type", "application/json")])

    app = await upstream(created)
    sc = await sidecar_factory({"app": {"url": app.url, **PATIENT}, **ORDERS})
    url = f"http://127.0.0.1:{sc.ports['inbound']}/orders"
    lines = await java(java_client, "POST", url, "{}")
    assert [(code, outcome) for _, code, _, _, outcome, _ in lines] == [("201", "Committed")] * 2
    xids = [xid for _, _, _, xid, _, _ in lines]
    assert [r.get("XID") for r in app.requests] == xids
    assert len(set(xids)) == 2


async def test_java_speaks_http2_to_a_tls_listener(
    sidecar_factory: Any, upstream: UpstreamFactory, java_client: list[str], tmp_path: Path
) -> None:
    """Over TLS, Java's HttpClient negotiates h2 by ALPN: its own HTTP/2 implementation (strict
    about SETTINGS, flow control and pseudo-headers) against the sidecar's."""

    async def echo(req: Received, reply: Reply) -> None:
        await reply.send(200, b"got:" + req.body)

    app = await upstream(echo)
    pki = Pki(tmp_path)
    pair = pki.issue()
    sc = await sidecar_factory(
        {
            "app": {"url": app.url},
            "listeners": {
                "inbound": {
                    "bind": "127.0.0.1:0",
                    "tls": {"cert_file": pair.cert, "key_file": pair.key},
                }
            },
        }
    )
    store = tmp_path / "trust.p12"
    keytool = shutil.which("keytool")
    assert keytool is not None
    subprocess.run(
        [keytool, "-importcert", "-noprompt", "-file", pki.ca_file, "-alias", "ca",
         "-keystore", str(store), "-storetype", "PKCS12", "-storepass", "changeit"],
        check=True, capture_output=True,
    )  # fmt: skip
    java_tls = [
        java_client[0],
        f"-Djavax.net.ssl.trustStore={store}",
        "-Djavax.net.ssl.trustStorePassword=changeit",
        *java_client[1:],
    ]
    url = f"https://localhost:{sc.ports['inbound']}/items"
    lines = await java(java_tls, "POST", url, '{"sku":"A-1"}')
    assert lines == [["STATUS", "200", "HTTP_2", "-", "-", 'got:{"sku":"A-1"}']] * 2
    assert [r.body for r in app.requests] == [b'{"sku":"A-1"}'] * 2
