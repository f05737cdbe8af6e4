"""TLS terminated on the sidecar's listeners, with real handshakes on loopback: certificates
from a CA made in the test (trustme), mutual TLS, plaintext to a TLS port, the handshake
timeout, handshake failures counted by listener and reason, and `openssl s_client` as a
peer that is not Python."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import ssl
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sidecar.tls import ALPN_PROTOCOLS, PROXY_ALPN_PROTOCOLS
from tests.component.servers import wait_until
from tests.component.tlsfiles import Pair, Pki

REQUEST = b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path, "ca")


@pytest.fixture
def other_pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path, "other")


async def _app(aiohttp_server: Any) -> Any:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello from the app")

    app = web.Application()
    app.router.add_get("/hello", hello)
    return await aiohttp_server(app)


def _tls(pair: Pair, **extra: Any) -> dict[str, Any]:
    return {"cert_file": pair.cert, "key_file": pair.key, **extra}


async def _sidecar(sidecar_factory: Any, aiohttp_server: Any, **listeners: Any) -> Any:
    app = await _app(aiohttp_server)
    return await sidecar_factory(
        {
            "app": {"url": f"http://127.0.0.1:{app.port}"},
            "listeners": {
                name: {"bind": "127.0.0.1:0", "tls": tls} for name, tls in listeners.items()
            },
        }
    )


async def _exchange(port: int, ctx: ssl.SSLContext | None, data: bytes = REQUEST) -> bytes:
    """Connect (TLS with `ctx`), send `data`, read until the server closes. Raises what the
    handshake or the read raises."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost" if ctx else None
        ),
        10,
    )
    try:
        writer.write(data.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n"))
        return await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()


def _failures(sc: Any, listener: str, reason: str) -> float:
    value = sc.metrics.registry.get_sample_value(
        "gts_sidecar_tls_handshake_failures_total", {"listener": listener, "reason": reason}
    )
    return value or 0.0


async def test_inbound_terminates_tls_with_alpn_and_tls12_or_later(
    sidecar_factory, aiohttp_server, pki
) -> None:
    sc = await _sidecar(sidecar_factory, aiohttp_server, inbound=_tls(pki.issue()))
    ctx = pki.client_context()
    ctx.set_alpn_protocols(["http/1.1"])
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", sc.ports["inbound"], ssl=ctx, server_hostname="localhost"
    )
    obj = writer.get_extra_info("ssl_object")
    assert obj.selected_alpn_protocol() == "http/1.1"
    assert obj.version() in ("TLSv1.2", "TLSv1.3")
    for ctx_in_force in (sc.tls["inbound"].current, sc.tls["inbound"].base):
        assert ctx_in_force.minimum_version == ssl.TLSVersion.TLSv1_2
    writer.write(REQUEST)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_plaintext_to_a_tls_port_is_refused_and_counted(
    sidecar_factory, aiohttp_server, pki
) -> None:
    sc = await _sidecar(
        sidecar_factory, aiohttp_server, inbound=_tls(pki.issue()), admin=_tls(pki.issue())
    )
    for listener in ("inbound", "admin"):
        try:
            answer = await _exchange(sc.ports[listener], None)
        except ConnectionError:
            answer = b""
        assert not answer.startswith(b"HTTP/"), (listener, answer[:80])
        await wait_until(lambda name=listener: _failures(sc, name, "plaintext") == 1)


async def test_mtls_accepts_the_right_client_certificate_only(
    sidecar_factory, aiohttp_server, pki, other_pki
) -> None:
    clients = Pki(pki.root, "clients")
    tls = _tls(pki.issue(), client_ca_file=clients.ca_file)
    sc = await _sidecar(sidecar_factory, aiohttp_server, inbound=tls, peer=tls)
    port = sc.ports["inbound"]

    good = await _exchange(port, pki.client_context(clients.issue(common_name="order-svc")))
    assert good.startswith(b"HTTP/1.1 200") and good.endswith(b"hello from the app")

    # without a certificate, and with one from another CA: no request reaches the app
    for ctx, reason in (
        (pki.client_context(), "no_client_cert"),
        (pki.client_context(other_pki.issue()), "client_cert_rejected"),
    ):
        try:
            answer = await _exchange(port, ctx)
        except (ssl.SSLError, ConnectionError):
            answer = b""
        assert not answer.startswith(b"HTTP/"), (reason, answer[:80])
        await wait_until(lambda reason=reason: _failures(sc, "inbound", reason) == 1)

    # the control-plane listeners (aiohttp) take the same settings
    peer = await _exchange(
        sc.ports["peer"],
        pki.client_context(clients.issue()),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert peer.startswith(b"HTTP/1.1 200")
    try:
        answer = await _exchange(
            sc.ports["peer"], pki.client_context(), b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        )
    except (ssl.SSLError, ConnectionError):
        answer = b""
    assert not answer.startswith(b"HTTP/")
    await wait_until(lambda: _failures(sc, "peer", "no_client_cert") == 1)


async def test_optional_client_certificate_is_verified_when_sent(
    sidecar_factory, aiohttp_server, pki, other_pki
) -> None:
    tls = _tls(pki.issue(), client_ca_file=pki.ca_file, require_client_cert=False)
    sc = await _sidecar(sidecar_factory, aiohttp_server, inbound=tls)
    port = sc.ports["inbound"]
    assert (await _exchange(port, pki.client_context())).startswith(b"HTTP/1.1 200")
    assert (await _exchange(port, pki.client_context(pki.issue()))).startswith(b"HTTP/1.1 200")
    try:
        answer = await _exchange(port, pki.client_context(other_pki.issue()))
    except (ssl.SSLError, ConnectionError):
        answer = b""
    assert not answer.startswith(b"HTTP/")


async def test_a_stalled_handshake_is_cut_at_the_handshake_timeout(
    sidecar_factory, aiohttp_server, pki
) -> None:
    tls = _tls(pki.issue(), handshake_timeout="100ms")
    sc = await _sidecar(sidecar_factory, aiohttp_server, inbound=tls, api=tls)
    for listener in ("inbound", "api"):
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.ports[listener])
        writer.write(b"\x16\x03\x01")  # the first bytes of a ClientHello, then nothing
        # closed by the server: read returns at EOF long before this wait (10x and more)
        assert await asyncio.wait_for(reader.read(-1), 10) == b""
        writer.close()

    def counted() -> bool:
        gc.collect()  # the dropped handshake is counted when its object goes
        return all(_failures(sc, name, "incomplete") >= 1 for name in ("inbound", "api"))

    await wait_until(counted)


async def test_openssl_s_client_verifies_the_chain_and_gets_an_answer(
    sidecar_factory, aiohttp_server, pki
) -> None:
    if shutil.which("openssl") is None:
        message = "no openssl CLI (scripts/system-deps.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    clients = Pki(pki.root, "clients")
    client = clients.issue()
    tls = _tls(pki.issue(), client_ca_file=clients.ca_file)
    sc = await _sidecar(sidecar_factory, aiohttp_server, inbound=tls)
    args = [
        "openssl", "s_client", "-connect", f"127.0.0.1:{sc.ports['inbound']}",
        "-servername", "localhost", "-verify_hostname", "localhost", "-CAfile", pki.ca_file,
        "-alpn", "http/1.1", "-ign_eof",
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *args, "-cert", client.cert, "-key", client.key,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(
        proc.communicate(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), 30
    )
    text = out.decode("latin-1")
    assert "Verify return code: 0 (ok)" in text
    assert "ALPN protocol: http/1.1" in text
    assert "HTTP/1.1 200" in text and "hello from the app" in text

    # without its client certificate openssl gets no answer
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(
        proc.communicate(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), 30
    )
    assert "HTTP/1.1 200" not in out.decode("latin-1")


async def test_a_bad_certificate_file_is_refused_at_start(sidecar_factory, pki, tmp_path) -> None:
    from sidecar.errors import ConfigError

    good, other = pki.issue(), pki.issue()
    cases = {
        "does not exist": _tls(Pair(str(tmp_path / "missing.crt"), good.key)),
        "does not belong": _tls(Pair(good.cert, other.key)),
        "not usable": _tls(Pair(pki.ca_file.replace("ca.pem", "ca-1.key"), good.key)),
        "expired on": _tls(pki.issue(expired=True)),
    }
    for words, tls in cases.items():
        with pytest.raises(ConfigError) as info:
            await sidecar_factory({"listeners": {"inbound": {"bind": "127.0.0.1:0", "tls": tls}}})
        (problem,) = info.value.problems
        assert problem.startswith("listeners.inbound.tls: ") and words in problem, problem


def test_check_config_reads_the_tls_files(pki, tmp_path, capsys) -> None:
    """check-config reports a certificate or key that start would refuse, with its key path."""
    import yaml

    from sidecar import cli

    good, other = pki.issue(), pki.issue()
    path = tmp_path / "sidecar.yaml"
    for pair, ok in ((good, True), (Pair(good.cert, other.key), False)):
        inbound = {"bind": "127.0.0.1:0", "tls": _tls(pair)}
        path.write_text(yaml.safe_dump({"listeners": {"inbound": inbound}}))
        assert cli.check_config(str(path)) == (0 if ok else 2)
    err = capsys.readouterr().err
    assert "listeners.inbound.tls: key_file does not belong to cert_file" in err


async def test_alpn_h2_on_the_proxy_listeners_http11_on_the_control_plane(
    sidecar_factory, aiohttp_server, pki
) -> None:
    """A client offering h2 gets HTTP/2 on the inbound listener (the same port serves both)
    and HTTP/1.1 on the admin listener, whose server speaks nothing else."""
    from tests.component.h2client import H2Client

    tls = _tls(pki.issue())
    sc = await _sidecar(sidecar_factory, aiohttp_server, inbound=tls, admin=tls)
    ctx = pki.client_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", sc.ports["inbound"], ssl=ctx, server_hostname="localhost"
    )
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
    assert PROXY_ALPN_PROTOCOLS == ("h2", "http/1.1")
    client = H2Client(reader, writer)
    client.conn.initiate_connection()
    await client.flush()
    response = await client.get("/hello", timeout=10)
    assert response.status == 200 and response.body == b"hello from the app"
    client.close()

    _, writer = await asyncio.open_connection(
        "127.0.0.1", sc.ports["admin"], ssl=ctx, server_hostname="localhost"
    )
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == ALPN_PROTOCOLS[0]
    writer.close()
