"""tls_cert: the validity period read from a PEM certificate (certificates made with trustme
and with the openssl CLI), and malformed input refused with ValueError only."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

from sidecar.tls_cert import pem_validity, validity

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def test_a_leaf_of_a_chain_and_its_dates() -> None:
    ca = trustme.CA()
    start, end = NOW - dt.timedelta(days=3), NOW + dt.timedelta(days=40)
    leaf = ca.issue_cert("localhost", not_before=start, not_after=end)
    chain = b"".join(b.bytes() for b in leaf.cert_chain_pems)
    assert pem_validity(chain) == (start, end)  # the first certificate: the leaf


def test_utc_time_from_the_openssl_cli(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        message = "no openssl CLI (scripts/system-deps.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "2", "-subj", "/CN=x", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    end = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-enddate"],
        check=True, capture_output=True, text=True,
    ).stdout.strip().removeprefix("notAfter=")  # fmt: skip
    expected = dt.datetime.strptime(end, "%b %d %H:%M:%S %Y GMT").replace(tzinfo=dt.UTC)
    assert pem_validity(cert.read_bytes())[1] == expected


@pytest.mark.parametrize(
    "pem",
    [b"", b"not a certificate", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"],
)
def test_malformed_input_is_a_value_error(pem: bytes) -> None:
    with pytest.raises(ValueError):
        pem_validity(pem)


@given(st.binary(max_size=300))
def test_any_der_bytes_give_dates_or_a_value_error(der: bytes) -> None:
    try:
        validity(der)
    except ValueError:
        pass
