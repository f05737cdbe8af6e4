"""Certificates made in the tests (trustme): a CA, leaf certificates written as PEM files,
client contexts, and a Kubernetes-style Secret directory whose `..data` symlink is swapped."""

from __future__ import annotations

import datetime
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass
class Pair:
    cert: str
    key: str


class Pki:
    """One CA and the files of the certificates it issues, under `root`."""

    def __init__(self, root: Path, name: str = "ca") -> None:
        self.root = root
        self.name = name
        self.ca = trustme.CA()
        self.ca_file = str(root / f"{name}.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        self._n = 0

    def issue(
        self,
        *names: str,
        expired: bool = False,
        common_name: str | None = None,
        not_after: datetime.datetime | None = None,
    ) -> Pair:
        self._n += 1
        kwargs = {}
        if not_after is not None:
            kwargs = {"not_after": not_after.replace(microsecond=0)}
        if expired:
            now = datetime.datetime.now(datetime.UTC)
            kwargs = {
                "not_before": now - datetime.timedelta(days=30),
                "not_after": now - datetime.timedelta(days=1),
            }
        leaf = self.ca.issue_cert(
            *(names or ("localhost", "127.0.0.1")), common_name=common_name, **kwargs
        )
        pair = Pair(
            str(self.root / f"{self.name}-{self._n}.crt"),
            str(self.root / f"{self.name}-{self._n}.key"),
        )
        Path(pair.cert).write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(pair.key)
        return pair

    def client_context(self, pair: Pair | None = None) -> ssl.SSLContext:
        """A client that trusts this CA (and presents `pair` when given)."""
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if pair is not None:
            ctx.load_cert_chain(pair.cert, pair.key)
        return ctx

    def server_context(self, pair: Pair, client_ca: str | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(pair.cert, pair.key)
        if client_ca is not None:
            ctx.load_verify_locations(cafile=client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


class SecretDir:
    """Mimics the kubelet's atomic writer for a Secret: dir/tls.crt → ..data/tls.crt, with
    ..data → ..<version> swapped by rename."""

    def __init__(self, root: Path, keys: tuple[str, ...] = ("tls.crt", "tls.key")) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.version = 0
        for key in keys:
            (root / key).symlink_to(f"..data/{key}")

    def path(self, key: str) -> str:
        return str(self.root / key)

    def publish(self, files: dict[str, bytes]) -> None:
        self.version += 1
        vdir = self.root / f"..2026_12_05_{self.version:04d}"
        vdir.mkdir()
        for key, data in files.items():
            (vdir / key).write_bytes(data)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(vdir.name)
        os.replace(tmp, self.root / "..data")


def pair_files(pair: Pair) -> dict[str, bytes]:
    return {"tls.crt": Path(pair.cert).read_bytes(), "tls.key": Path(pair.key).read_bytes()}


def peer_common_name(ssl_object: ssl.SSLObject | None) -> str:
    assert ssl_object is not None
    cert = ssl_object.getpeercert()
    assert cert
    for rdn in cert["subject"]:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""
