"""TLS the sidecar originates to https:// upstreams and the app: a custom CA, a client
certificate (mutual TLS), SNI / the name verified; an expired, wrong-host or untrusted
certificate is refused with 502 UPSTREAM_UNAVAILABLE naming why. Real handshakes on loopback
with certificates made in the test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.component.tlsfiles import Pair, Pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path, "ca")


async def _https_upstream(aiohttp_server: Any, pki: Pki, pair: Pair, client_ca: str | None = None):
    async def hello(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        who = ""
        if peer:
            who = dict(x[0] for x in peer["subject"]).get("commonName", "")
        return web.Response(text=f"secure hello {who}".strip())

    app = web.Application()
    app.router.add_get("/hello", hello)
    return await aiohttp_server(app, ssl=pki.server_context(pair, client_ca))


async def _call(sc: Any, upstream: str) -> tuple[int, str | None, Any]:
    url = f"http://127.0.0.1:{sc.ports['outbound']}/{upstream}/hello"
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            body = await r.json() if r.headers.get("x-gts-sidecar-error") else await r.text()
            return r.status, r.headers.get("x-gts-sidecar-error"), body


def _upstream(port: int, host: str = "localhost", **tls: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"url": f"https://{host}:{port}"}
    if tls:
        out["tls"] = tls
    return out


async def test_custom_ca_client_certificate_and_server_name(
    sidecar_factory, aiohttp_server, pki
) -> None:
    clients = Pki(pki.root, "clients")
    plain = await _https_upstream(aiohttp_server, pki, pki.issue())
    mutual = await _https_upstream(aiohttp_server, pki, pki.issue(), client_ca=clients.ca_file)
    named = await _https_upstream(aiohttp_server, pki, pki.issue("inventory.internal"))
    me = clients.issue(common_name="order-sidecar")
    sc = await sidecar_factory(
        {
            "upstreams": {
                "plain": _upstream(plain.port, ca_file=pki.ca_file),
                "mutual": _upstream(
                    mutual.port, ca_file=pki.ca_file, cert_file=me.cert, key_file=me.key
                ),
                "mutual-anonymous": _upstream(mutual.port, ca_file=pki.ca_file),
                "named": _upstream(
                    named.port, "127.0.0.1", ca_file=pki.ca_file, server_name="inventory.internal"
                ),
                "system-cas": _upstream(plain.port),
            }
        }
    )
    assert await _call(sc, "plain") == (200, None, "secure hello")
    assert await _call(sc, "mutual") == (200, None, "secure hello order-sidecar")
    assert await _call(sc, "named") == (200, None, "secure hello")

    status, code, body = await _call(sc, "system-cas")
    assert (status, code) == (502, "UPSTREAM_UNAVAILABLE")
    assert "TLS handshake with upstream 'system-cas'" in body["error"]["message"]
    assert "unable to get local issuer certificate" in body["error"]["message"]

    status, code, body = await _call(sc, "mutual-anonymous")
    assert (status, code) == (502, "UPSTREAM_UNAVAILABLE")


@pytest.mark.parametrize(
    ("issue", "why"),
    [
        (lambda pki: pki.issue(expired=True), "certificate has expired"),
        (lambda pki: pki.issue("elsewhere.example"), "Hostname mismatch"),
    ],
    ids=["expired", "wrong-host"],
)
async def test_a_bad_upstream_certificate_is_502_naming_why(
    sidecar_factory, aiohttp_server, pki, issue, why
) -> None:
    server = await _https_upstream(aiohttp_server, pki, issue(pki))
    sc = await sidecar_factory(
        {
            "upstreams": {"bad": _upstream(server.port, ca_file=pki.ca_file)},
            "app": {"url": f"https://localhost:{server.port}", "tls": {"ca_file": pki.ca_file}},
        }
    )
    status, code, body = await _call(sc, "bad")
    assert (status, code) == (502, "UPSTREAM_UNAVAILABLE")
    message = body["error"]["message"]
    assert "TLS handshake with upstream 'bad'" in message and why in message, message
    # the app behind the inbound listener is a cluster like any other
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{sc.ports['inbound']}/hello") as r:
            assert r.status == 502 and r.headers["x-gts-sidecar-error"] == "UPSTREAM_UNAVAILABLE"
            assert why in (await r.json())["error"]["message"]


async def test_verify_false_accepts_any_certificate(sidecar_factory, aiohttp_server, pki) -> None:
    server = await _https_upstream(aiohttp_server, pki, pki.issue("elsewhere.example"))
    sc = await sidecar_factory({"upstreams": {"lax": _upstream(server.port, verify=False)}})
    assert await _call(sc, "lax") == (200, None, "secure hello")


def test_tls_needs_an_https_url_and_pairs() -> None:
    from sidecar import config
    from sidecar.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        config.parse(
            {
                "upstreams": {"u": {"url": "http://u:80", "tls": {"ca_file": "/ca.pem"}}},
                "coordinator": {"tls": {"cert_file": "/c.pem"}},
                "listeners": {"inbound": {"tls": {"cert_file": "/c", "key_file": "/k",
                                                  "require_client_cert": True}}},
            },
            env={},
        )  # fmt: skip
    problems = "\n".join(info.value.problems)
    assert "upstreams.u: tls applies to an https:// url only" in problems
    assert "coordinator.tls: cert_file and key_file go together" in problems
    assert "listeners.inbound.tls: require_client_cert needs client_ca_file" in problems


async def test_phase_two_callbacks_to_https_use_coordinator_tls(
    sidecar_factory, aiohttp_server, pki
) -> None:
    """The local coordinator's phase-two callbacks to an https:// callbackUrl trust
    coordinator.tls's CA (a participant whose peer listener terminates TLS)."""
    from tests.component.gts import SignedClient, ring, signing_config

    calls: list[str] = []

    async def callback(request: web.Request) -> web.Response:
        calls.append(request.path)
        return web.json_response({"status": "PhaseTwo_Committed"})

    app = web.Application()
    app.router.add_post("/branches/{resource}/{phase}", callback)
    server = await aiohttp_server(app, ssl=pki.server_context(pki.issue("participant.internal")))
    sc = await sidecar_factory(
        {
            **signing_config(pki.root),
            "coordinator": {
                **signing_config(pki.root)["coordinator"],
                "tls": {"ca_file": pki.ca_file, "server_name": "participant.internal"},
            },
        }
    )
    async with aiohttp.ClientSession() as session:
        client = SignedClient(session, sc.ports["peer"], ring())
        xid = await client.start()
        await client.register(xid, f"https://127.0.0.1:{server.port}/branches/stock")
        path = "/api/v1/transaction/" + xid.replace(":", "%3A") + "/commit"
        reply = await client.call("POST", path)
        assert reply.status == 200, reply.raw
        assert reply.json()["status"] == "Committed"
    assert calls == ["/branches/stock/commit"]
