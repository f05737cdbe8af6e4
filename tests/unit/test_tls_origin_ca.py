"""An origination's `ca_file` replaces the system's CAs (docs/operations.md): a server whose
certificate chains only to a CA of the system store is refused, and the system bundle is not
loaded into such a context at all (it costs ~1.3 MiB per context). The "system store" here is
one CA of the test's own, put there with SSL_CERT_FILE, which OpenSSL reads when the default
paths are loaded. And origins asking for the same context share one."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
import trustme
import yaml

from sidecar import config as configmod
from sidecar.config import OriginTlsConfig
from sidecar.schema import construct
from sidecar.tls import TlsConfigError, build, client_context


@pytest.fixture
def cas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[trustme.CA, trustme.CA, Path]:
    """(the system's CA, the configured CA, the configured CA's file)."""
    system, private = trustme.CA(), trustme.CA()
    system_file, private_file = tmp_path / "system.pem", tmp_path / "private.pem"
    system.cert_pem.write_to_path(str(system_file))
    private.cert_pem.write_to_path(str(private_file))
    empty = tmp_path / "no-certs"
    empty.mkdir()
    monkeypatch.setenv("SSL_CERT_FILE", str(system_file))
    monkeypatch.setenv("SSL_CERT_DIR", str(empty))
    return system, private, private_file


async def _handshake(server_ca: trustme.CA, client: ssl.SSLContext) -> None:
    """A TLS server on loopback with a certificate for localhost from `server_ca`."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ca.issue_cert("localhost").configure_cert(server_ctx)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="localhost"
        )
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_ca_file_replaces_the_system_cas(cas: tuple[trustme.CA, trustme.CA, Path]) -> None:
    system, private, private_file = cas
    ctx = client_context(OriginTlsConfig(ca_file=str(private_file)))
    assert ctx.cert_store_stats()["x509_ca"] == 1  # the configured CA only
    await _handshake(private, ctx)  # its own CA: trusted
    with pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(system, ctx)  # only the system's CA vouches for it: refused


async def test_without_ca_file_the_system_cas_are_trusted(
    cas: tuple[trustme.CA, trustme.CA, Path],
) -> None:
    system, private, _ = cas
    ctx = client_context(OriginTlsConfig())
    await _handshake(system, ctx)
    with pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(private, ctx)


def test_a_missing_ca_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError, match="ca_file .* does not exist"):
        client_context(construct(OriginTlsConfig, ca_file=str(tmp_path / "nope.pem")))


def test_origins_asking_for_the_same_context_share_one(
    cas: tuple[trustme.CA, trustme.CA, Path],
) -> None:
    """Each context without a ca_file parses the system's CA bundle (~1.3 MiB): https
    upstreams with the same TLS settings, and the coordinator's context, are one object;
    another ca_file or another ALPN list is another context."""
    _, _, private_file = cas
    data = yaml.safe_load((Path(__file__).parents[2] / "config" / "sidecar.yaml").read_text())
    data["app"]["url"] = "https://app.internal:8443"
    data["app"]["protocol"] = "h2"  # offers h2 only: a context of its own
    data["upstreams"] = {
        "a": {"url": "https://a.internal"},
        "b": {"url": "https://b.internal:8443"},
        "c": {"url": "https://c.internal", "tls": {"server_name": "c.example"}},
        "private": {"url": "https://p.internal", "tls": {"ca_file": str(private_file)}},
        "private2": {"url": "https://q.internal", "tls": {"ca_file": str(private_file)}},
        "plain": {"url": "http://plain.internal"},
    }
    tls = build(configmod.parse(data, env={}))
    clients = tls.clients
    assert set(clients) == {
        "app",
        "upstream:a",
        "upstream:b",
        "upstream:c",
        "upstream:private",
        "upstream:private2",
    }
    assert clients["upstream:a"] is clients["upstream:b"] is clients["upstream:c"]
    assert clients["upstream:a"] is tls.coordinator
    assert clients["upstream:private"] is clients["upstream:private2"]
    assert clients["upstream:private"] is not clients["upstream:a"]
    assert clients["app"] is not clients["upstream:a"]
    assert clients["app"].cert_store_stats() == clients["upstream:a"].cert_store_stats()
