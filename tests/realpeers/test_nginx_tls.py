"""TLS between nginx and the sidecar, both ways: nginx verifying the inbound listener's
certificate, and nginx terminating TLS as the app (HTTP/1.1, and HTTP/2 chosen by ALPN),
ending its connections with a close_notify alert."""

from __future__ import annotations

import pytest

from tests.component.servers import get, wait_until
from tests.component.tlsfiles import Pki
from tests.realpeers.peers import (
    GOOD_XID,
    TLS_INGRESS,
    TLS_SERVER,
    connections_to,
    fields,
    idle,
    retries,
    xid,
)


async def test_an_nginx_ingress_over_tls_verifies_the_sidecar_and_reuses_one_connection(
    sidecar_factory, upstream, connect, nginx, tmp_path
):
    pki = Pki(tmp_path)
    pair = pki.issue("localhost", "127.0.0.1")
    app = await upstream()
    tls = {"cert_file": pair.cert, "key_file": pair.key}
    sc = await sidecar_factory({"app": {"url": app.url}, "listeners": {"inbound": {"tls": tls}}})
    inbound = sc.ports["inbound"]
    ingress = await nginx(TLS_INGRESS, inbound=inbound, ca=pki.ca_file)
    before = connections_to(inbound)
    client = await connect(ingress.port)
    for i in range(10):
        await client.send(get(f"/items/{i}", f"XID: {xid(i)}"))
        resp = await client.response()
        assert resp.status == 200, ingress.error_log()[-2000:]
    assert len(connections_to(inbound) - before) == 1
    assert [r.get("XID") for r in app.requests] == [xid(i) for i in range(10)]


@pytest.mark.parametrize("protocol", ["http1", "h2"])
async def test_a_tls_nginx_app_closing_its_connections_never_costs_a_request(
    sidecar_factory, connect, nginx, tmp_path, protocol
):
    """nginx ends TLS connections with a close_notify alert: after `keepalive_requests`
    (pipelined requests: the next is waiting as the answer ends) and when idle."""
    pki = Pki(tmp_path)
    pair = pki.issue("localhost", "127.0.0.1")
    http2 = "http2" if protocol == "h2" else ""
    server = await nginx(
        TLS_SERVER, cert=pair.cert, key=pair.key, http2=http2,
        keepalive_timeout="1s", keepalive_requests=2,
    )  # fmt: skip
    app = {
        "url": f"https://localhost:{server.port}",
        "tls": {"ca_file": pki.ca_file},
        "protocol": protocol,
        "pool": {"idle_timeout": "5m"},
    }
    sc = await sidecar_factory({"app": app})
    client = await connect(sc.ports["inbound"])
    await client.send(b"".join(get(f"/r{i}", f"XID: {xid(i)}", f"X-Req: {i}") for i in range(5)))
    for _ in range(5):
        resp = await client.response()
        assert resp.status == 200 and resp.body == b"ok\n", resp.body
    # one connection left idle (on HTTP/2 the GOAWAY'd ones leave the pool at nginx's close)
    await wait_until(lambda: idle(sc) == 1)
    await wait_until(lambda: idle(sc) == 0, timeout=15)
    await client.send(get("/pay", f"XID: {GOOD_XID}", "X-Req: 5", method="POST", body=b"{}"))
    resp = await client.response()
    assert resp.status == 200, resp.body
    lines = [fields(line) for line in await server.wait_log_lines(6)]
    assert [line["req"] for line in lines] == [str(i) for i in range(6)]
    assert [line["n"] for line in lines] == ["1", "2", "1", "2", "1", "1"]
    assert [line["xid"] for line in lines] == [xid(i) for i in range(5)] + [GOOD_XID]
    assert retries(sc) == 0
