"""The few fields of an X.509 certificate (RFC 5280 4.1) the gateway reads: its dates and its
subject's common name, for the warnings of a certificate file (`tls.certificate_warnings`).

Read from the DER by hand: the `ssl` module decodes a certificate only through a private
function, and only the first of a file; the `cryptography` package is not a dependency of the
gateway, nor is an `openssl` command on the machine. A certificate this reading cannot follow
raises ValueError; OpenSSL has loaded the file already, so that is no reason to refuse it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = ["CertificateFields", "certificate_fields"]

_SEQUENCE, _SET, _OID = 0x30, 0x31, 0x06
_UTC_TIME, _GENERALIZED_TIME = 0x17, 0x18
_COMMON_NAME = bytes((0x55, 0x04, 0x03))  # 2.5.4.3
# The string types a name's attribute is written in, with the encoding each stands for;
# TeletexString (0x14) is in practice Latin-1.
_STRINGS = {
    0x0C: "utf-8",  # UTF8String
    0x13: "ascii",  # PrintableString
    0x14: "latin-1",  # TeletexString
    0x16: "ascii",  # IA5String
    0x1C: "utf-32-be",  # UniversalString
    0x1E: "utf-16-be",  # BMPString
}


@dataclass(frozen=True, slots=True)
class CertificateFields:
    not_before: float  # Unix times
    not_after: float
    common_name: str | None  # the subject's (its last, if it has several)


def certificate_fields(der: bytes) -> CertificateFields:
    """The dates and subject CN of the DER certificate `der`; ValueError if it cannot tell."""
    _, tbs, _ = _item(der, 0)  # Certificate
    _, at, _ = _item(der, tbs)  # TBSCertificate
    if der[at] == 0xA0:  # [0] version
        at = _item(der, at)[2]
    for _ in range(3):  # serialNumber, signature, issuer
        at = _item(der, at)[2]
    tag, validity, subject = _item(der, at)
    if tag != _SEQUENCE:
        raise ValueError("no validity")
    not_before_end = _item(der, validity)[2]
    return CertificateFields(
        not_before=_time(der, validity),
        not_after=_time(der, not_before_end),
        common_name=_common_name(der, subject),
    )


def _item(data: bytes, at: int) -> tuple[int, int, int]:
    """The DER item at `at`: its tag, where its content starts and where it ends."""
    if at + 2 > len(data):
        raise ValueError("truncated")
    tag, length = data[at], data[at + 1]
    at += 2
    if length & 0x80:
        size = length & 0x7F
        length = int.from_bytes(data[at : at + size], "big")
        at += size
    if at + length > len(data):
        raise ValueError("truncated")
    return tag, at, at + length


def _time(der: bytes, at: int) -> float:
    tag, start, end = _item(der, at)
    text = der[start:end].decode("ascii")
    # UTCTime has two digits for the year (RFC 5280 4.1.2.5.1: 50-99 are 19xx).
    if tag == _UTC_TIME:
        text = ("19" if int(text[:2]) >= 50 else "20") + text
    elif tag != _GENERALIZED_TIME:
        raise ValueError("not a time")
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC).timestamp()


def _common_name(der: bytes, at: int) -> str | None:
    """The CN of the Name at `at` (a SEQUENCE of SETs of SEQUENCE {type, value})."""
    tag, start, end = _item(der, at)
    if tag != _SEQUENCE:
        raise ValueError("no subject")
    found = None
    while start < end:
        tag, attribute, start = _item(der, start)  # one RDN: a SET
        if tag != _SET:
            raise ValueError("not a name")
        while attribute < start:
            _, pair, attribute = _item(der, attribute)  # SEQUENCE {type, value}
            tag, oid, oid_end = _item(der, pair)
            if tag == _OID and der[oid:oid_end] == _COMMON_NAME:
                tag, value, value_end = _item(der, oid_end)
                encoding = _STRINGS.get(tag)
                if encoding is not None:
                    found = der[value:value_end].decode(encoding, "replace")
    # Written into a log line: a control character (a line break) would forge another.
    return None if found is None else "".join(c if c.isprintable() else "?" for c in found)
