"""The validity period of a PEM certificate, read with a minimal DER walk (the standard
library's `ssl` loads certificates but never says when one expires).

Rules: pure (bytes in, datetimes out, no I/O); only the path to `validity` is walked:
Certificate → tbsCertificate → [version] serialNumber signature issuer validity. Anything
else in the encoding is skipped by its length. Malformed input raises ValueError.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime
from typing import Final

_PEM_RE: Final = re.compile(
    rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.DOTALL
)
_SEQUENCE: Final = 0x30
_UTC_TIME: Final = 0x17
_GENERALIZED_TIME: Final = 0x18
_VERSION_TAG: Final = 0xA0  # [0] EXPLICIT


def _read(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of the content, end of the content) of the element at `pos`."""
    if pos + 2 > len(der):
        raise ValueError("truncated DER")
    tag, first = der[pos], der[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(der):
            raise ValueError("unsupported DER length")
        length = int.from_bytes(der[pos : pos + count], "big")
        pos += count
    if pos + length > len(der):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _time(tag: int, raw: bytes) -> datetime:
    text = raw.decode("ascii")
    if tag == _UTC_TIME:  # YYMMDDHHMMSSZ; 50-99 are 19xx (RFC 5280)
        parsed = datetime.strptime(text, "%y%m%d%H%M%SZ")
        if parsed.year >= 2050:
            parsed = parsed.replace(year=parsed.year - 100)
    elif tag == _GENERALIZED_TIME:
        parsed = datetime.strptime(text, "%Y%m%d%H%M%SZ")
    else:
        raise ValueError(f"not a time (tag {tag:#x})")
    return parsed.replace(tzinfo=UTC)


def validity(der: bytes) -> tuple[datetime, datetime]:
    """(notBefore, notAfter) of one DER certificate."""
    tag, start, _ = _read(der, 0)
    if tag != _SEQUENCE:
        raise ValueError("not a certificate")
    tag, pos, tbs_end = _read(der, start)  # tbsCertificate
    if tag != _SEQUENCE:
        raise ValueError("not a certificate")
    tag, _, end = _read(der, pos)
    if tag == _VERSION_TAG:
        pos = end
    for _ in range(3):  # serialNumber, signature, issuer
        _, _, pos = _read(der, pos)
    tag, pos, end = _read(der, pos)
    if tag != _SEQUENCE or end > tbs_end:
        raise ValueError("no validity in the certificate")
    tag, start, stop = _read(der, pos)
    not_before = _time(tag, der[start:stop])
    tag, start, stop = _read(der, stop)
    return not_before, _time(tag, der[start:stop])


def pem_validity(pem: bytes) -> tuple[datetime, datetime]:
    """(notBefore, notAfter) of the first certificate in PEM text (the leaf of a chain)."""
    m = _PEM_RE.search(pem)
    if m is None:
        raise ValueError("no PEM certificate")
    try:
        der = base64.b64decode(m.group(1), validate=False)
    except binascii.Error:
        raise ValueError("invalid base64 in the PEM certificate") from None
    return validity(der)
