"""Go's net/http speaking HTTP/2 to a TLS inbound listener (ALPN h2): the Go standard
library's own HTTP/2 client, not ours and not nghttp2's, with several requests in flight on
one connection. A request the Go client gives up on is reset (RST_STREAM CANCEL, where
HTTP/1.1 would close the connection): the app's request must end and a declarative
transaction it began must roll back, as with HTTP/1.1.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.component.servers import Received, Reply, UpstreamFactory, sample, wait_until
from tests.component.test_abandon import ORDERS, PATIENT, WaitsForItsClient, rolled_back
from tests.component.tlsfiles import Pki

GOOD_XID = "10.0.0.1:8091:2001"


async def go(
    client: Path, ca: str, url: str, *args: str, xid: str | None = None, cookie: str | None = None
) -> list[str]:
    env = {"XID": xid} if xid else {}
    if cookie:
        env["COOKIE"] = cookie
    proc = await asyncio.create_subprocess_exec(
        str(client), ca, url, *args, stdout=asyncio.subprocess.PIPE, env=env
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out
    return out.decode().splitlines()


async def _ok(req: Received, reply: Reply) -> None:
    await reply.send(200, b"ok")


async def _through_tls(
    sidecar_factory: Any,
    upstream: UpstreamFactory,
    tmp_path: Path,
    handler: Any,
    path: str,
    **cfg: Any,
) -> tuple[Any, Any, str, str]:
    """An app answering with `handler` behind a sidecar whose inbound listener is TLS:
    (the app, the sidecar, the CA file the client trusts, the URL of `path`)."""
    app = await upstream(handler)
    pki = Pki(tmp_path)
    pair = pki.issue()
    tls = {"cert_file": pair.cert, "key_file": pair.key}
    sc = await sidecar_factory(
        {
            "app": {"url": app.url, **PATIENT},
            "listeners": {"inbound": {"bind": "127.0.0.1:0", "tls": tls}},
            **cfg,
        }
    )
    return app, sc, pki.ca_file, f"https://localhost:{sc.ports['inbound']}{path}"


async def test_concurrent_go_requests_share_one_http2_connection_with_their_xid(
    sidecar_factory: Any, upstream: UpstreamFactory, go_h2_client: Path, tmp_path: Path
) -> None:
    app, sc, ca, url = await _through_tls(sidecar_factory, upstream, tmp_path, _ok, "/items")
    lines = await go(go_h2_client, ca, url, "10s", "20", "GET", xid=GOOD_XID)
    assert [line.split() for line in lines] == [["STATUS", "HTTP/2.0", "200"]] * 20
    assert [r.get("XID") for r in app.requests] == [GOOD_XID] * 20
    # one connection, twenty streams: the Go transport multiplexed them
    assert sample(sc, "gts_sidecar_http2_connections_total", listener="inbound") == 1
    assert sample(sc, "gts_sidecar_http2_streams_total", listener="inbound") == 20


async def test_a_malformed_xid_from_a_go_http2_client_is_refused_before_the_app(
    sidecar_factory: Any, upstream: UpstreamFactory, go_h2_client: Path, tmp_path: Path
) -> None:
    app, sc, ca, url = await _through_tls(sidecar_factory, upstream, tmp_path, _ok, "/items")
    lines = await go(go_h2_client, ca, url, "10s", "3", "GET", xid="10.0.0.1:8091:")
    assert [line.split() for line in lines] == [["STATUS", "HTTP/2.0", "400"]] * 3
    assert app.requests == []


async def test_a_go_http2_order_is_committed_and_its_xid_returned(
    sidecar_factory: Any, upstream: UpstreamFactory, go_h2_client: Path, tmp_path: Path
) -> None:
    async def created(req: Received, reply: Reply) -> None:
        await reply.send(201, b'{"id":"1"}', [("Content-Type", "application/json")])

    app, sc, ca, url = await _through_tls(
        sidecar_factory, upstream, tmp_path, created, "/orders", **ORDERS
    )
    (line,) = await go(go_h2_client, ca, url, "10s", "1", "POST", '{"sku":"A-1"}')
    _, proto, code, xid, outcome = line.split()
    assert (proto, code, outcome) == ("HTTP/2.0", "201", "Committed")
    assert app.requests[0].get("XID") == xid
    assert app.requests[0].body == b'{"sku":"A-1"}'


async def test_a_go_http2_client_that_times_out_rolls_its_order_back(
    sidecar_factory: Any, upstream: UpstreamFactory, go_h2_client: Path, tmp_path: Path
) -> None:
    handler = WaitsForItsClient()
    app, sc, ca, url = await _through_tls(
        sidecar_factory, upstream, tmp_path, handler, "/orders", **ORDERS
    )
    (line,) = await go(go_h2_client, ca, url, "1s", "1", "POST", '{"sku":"A-1"}')
    assert line.startswith("ERR") and "Client.Timeout exceeded" in line, line
    # the Go client reset its stream; the app's request ended with it, not at the 60 s total
    await asyncio.wait_for(handler.ended.wait(), 5)
    (xid,) = handler.xids
    assert xid is not None
    await rolled_back(sc, xid)
    await wait_until(lambda: sample(sc, "gts_sidecar_client_aborts_total", listener="inbound") == 1)


async def test_cookie_crumbs_from_go_reach_an_http11_app_as_one_field(
    sidecar_factory: Any, upstream: UpstreamFactory, go_h2_client: Path, tmp_path: Path
) -> None:
    """Go's HTTP/2 transport splits a Cookie into one field per crumb (as browsers do); an
    HTTP/1.1 app gets them joined by "; " in one field (RFC 9113 §8.2.3): many servers
    (aiohttp's request.cookies, CGI-style gateways) read only the first Cookie field."""

    app, sc, ca, url = await _through_tls(sidecar_factory, upstream, tmp_path, _ok, "/items")
    cookie = "session=abc; theme=dark; lang=en"
    (line,) = await go(go_h2_client, ca, url, "10s", "1", "GET", cookie=cookie)
    assert line.split()[:3] == ["STATUS", "HTTP/2.0", "200"]
    (req,) = app.requests
    assert req.get_all("Cookie") == [cookie]
