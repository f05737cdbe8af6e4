"""The injector's HTTPS server on loopback, with certificates made by the test (trustme):
AdmissionReviews answered, bad input answered with the JSON error shape, certificates
reloaded when their files change (a bad new pair refused, the old one kept)."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from sidecar.errors import ConfigError
from sidecar.injector_config import parse
from sidecar.injector_server import Injector

from .servers import wait_until

SERVICE = "gts-sidecar-injector.gts-system.svc"


class Certs:
    def __init__(self, tmp: Path) -> None:
        self.cert = tmp / "tls.crt"
        self.key = tmp / "tls.key"
        self.ca = trustme.CA()
        self.issue(self.ca)

    def issue(self, ca: trustme.CA) -> None:
        leaf = ca.issue_cert(SERVICE, "127.0.0.1")
        self.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        self.key.write_bytes(leaf.private_key_pem.bytes())

    def client(self, ca: trustme.CA | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        (ca or self.ca).configure_trust(ctx)
        return ctx


def config(certs: Certs, **inject: Any) -> Any:
    return parse(
        {
            "listen": {
                "bind": "127.0.0.1:0",
                "tls": {
                    "cert_file": str(certs.cert),
                    "key_file": str(certs.key),
                    "reload_interval": "20ms",
                    "handshake_timeout": "200ms",
                },
            },
            "inject": {"image": "registry.example.com/gts-sidecar:0.1.0", **inject},
            "max_request_bytes": "64KiB",
        }
    )


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


@pytest.fixture
async def injector(certs: Certs) -> AsyncIterator[Injector]:
    server = Injector(config(certs))
    await server.start()
    yield server
    await server.close()


def review(annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "b8d1c2a4-0000-4000-8000-000000000001",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "object": {
                "metadata": {"annotations": annotations},
                "spec": {"containers": [{"name": "app", "image": "app:1"}]},
            },
        },
    }


async def post(
    injector: Injector, ctx: ssl.SSLContext, body: bytes, host: str = SERVICE
) -> tuple[int, dict[str, str], Any]:
    # the API server connects by the Service's DNS name: resolve it to loopback here
    resolver = _Fixed(host)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=resolver)) as s:
        async with s.post(
            f"https://{host}:{injector.port}/mutate",
            data=body,
            headers={"Content-Type": "application/json"},
            ssl=ctx,
        ) as resp:
            return resp.status, dict(resp.headers), await resp.json()


class _Fixed(aiohttp.abc.AbstractResolver):
    def __init__(self, name: str) -> None:
        self.name = name

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[Any]:
        assert host in (self.name, "127.0.0.1")
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": port,
                "family": family,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        pass


async def test_an_annotated_pod_is_answered_with_its_patch(
    injector: Injector, certs: Certs
) -> None:
    body = json.dumps(review({"sidecar.gts.io/inject": "true"})).encode()
    status, headers, answer = await post(injector, certs.client(), body)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    response = answer["response"]
    assert response["uid"] == "b8d1c2a4-0000-4000-8000-000000000001"
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    assert ops[0]["path"] == "/spec/initContainers"
    assert ops[0]["value"][0]["image"] == "registry.example.com/gts-sidecar:0.1.0"
    # not annotated: allowed, no patch
    body = json.dumps(review({})).encode()
    _, _, answer = await post(injector, certs.client(), body)
    assert answer["response"] == {"uid": response["uid"], "allowed": True}


async def test_bad_input_is_a_json_error_never_a_crash(injector: Injector, certs: Certs) -> None:
    for body, status, code in (
        (b"not json", 400, "ADMISSION_REVIEW_INVALID"),
        (b'{"apiVersion": "v1", "kind": "Pod"}', 400, "ADMISSION_REVIEW_INVALID"),
        (b"{" + b" " * 70_000 + b"}", 413, "PAYLOAD_TOO_LARGE"),
    ):
        got, headers, answer = await post(injector, certs.client(), body)
        assert got == status, answer
        assert headers["x-gts-sidecar-error"] == code
        assert answer["error"]["code"] == code and answer["error"]["message"]
    # a pod that cannot be injected: an AdmissionReview that refuses it, with the reason
    body = json.dumps(review({"sidecar.gts.io/inject": "maybe"})).encode()
    status, _, answer = await post(injector, certs.client(), body)
    assert status == 200 and answer["response"]["allowed"] is False
    assert "must be" in answer["response"]["status"]["message"]
    # and the server still answers
    body = json.dumps(review({"sidecar.gts.io/inject": "true"})).encode()
    status, _, answer = await post(injector, certs.client(), body)
    assert status == 200 and "patch" in answer["response"]


async def test_only_https(injector: Injector) -> None:
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientError):
            async with s.post(f"http://127.0.0.1:{injector.port}/mutate", data=b"{}") as r:
                await r.read()


async def _issuer(injector: Injector, ctx: ssl.SSLContext, host: str) -> bool:
    """True when a fresh handshake with `ctx` (trusting one CA) succeeds."""
    try:
        await post(injector, ctx, json.dumps(review({})).encode(), host=host)
    except aiohttp.ClientConnectorCertificateError:
        return False
    return True


@pytest.mark.parametrize("host", [SERVICE, "127.0.0.1"], ids=["sni", "no-sni"])
async def test_a_renewed_certificate_is_used_without_a_restart(
    injector: Injector, certs: Certs, host: str
) -> None:
    old_ca = certs.ca
    assert await _issuer(injector, certs.client(old_ca), host)
    new_ca = trustme.CA()
    certs.issue(new_ca)
    await wait_until(lambda: injector.certificates.loads == 2)
    assert await _issuer(injector, certs.client(new_ca), host)
    assert not await _issuer(injector, certs.client(old_ca), host)


async def test_a_bad_new_pair_is_refused_and_the_old_one_kept(
    injector: Injector, certs: Certs
) -> None:
    good = certs.cert.read_bytes()
    # a new certificate beside the old key: they do not match
    other = trustme.CA().issue_cert(SERVICE)
    certs.cert.write_bytes(other.cert_chain_pems[0].bytes())
    assert injector.certificates.check() is False
    assert injector.certificates.loads == 1
    assert await _issuer(injector, certs.client(), SERVICE), "still the old pair"
    # garbage: refused too
    certs.cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n")
    assert injector.certificates.check() is False
    certs.cert.write_bytes(good + b"\n")
    assert injector.certificates.check() is True


def test_a_pair_that_cannot_be_loaded_stops_the_start(certs: Certs, tmp_path: Path) -> None:
    certs.key.write_text("not a key")
    with pytest.raises(ConfigError) as err:
        Injector(config(certs))
    assert err.value.problems[0].startswith("listen.tls: cannot load the certificate and key")
    missing = parse(
        {
            "listen": {"tls": {"cert_file": str(tmp_path / "no.crt"), "key_file": "no.key"}},
            "inject": {"image": "gts:1"},
        }
    )
    with pytest.raises(ConfigError):
        Injector(missing)


async def test_a_client_that_never_finishes_its_handshake_is_cut_off(
    injector: Injector,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", injector.port)
    try:
        # nothing sent: the server closes after listen.tls.handshake_timeout (200ms here),
        # not after asyncio's default of 60 s
        assert await asyncio.wait_for(reader.read(), timeout=10) == b""
    finally:
        writer.close()
