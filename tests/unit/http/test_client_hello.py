"""The versions a real ClientHello offers (OpenSSL's, made through memory BIOs), as the TLS
port reads them to refuse TLS 1.0 and 1.1 with their alert (gateway/http/client_hello.py)."""

from __future__ import annotations

import ssl
import warnings

import pytest

from gateway.http.client_hello import offers_only_old_versions


def client_hello(lowest: ssl.TLSVersion, highest: ssl.TLSVersion) -> bytes:
    context = ssl.create_default_context()
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():  # deprecated versions: the point of some of these
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version, context.maximum_version = lowest, highest
    client = context.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="x")
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass  # the ClientHello is out, the server's answer awaited
    except ssl.SSLError as exc:  # an OpenSSL built without the old versions
        pytest.skip(f"this OpenSSL offers no {lowest.name}-{highest.name}: {exc}")
    return out.read()


V = ssl.TLSVersion


@pytest.mark.parametrize(
    ("lowest", "highest", "old"),
    [
        (V.TLSv1, V.TLSv1, True),
        (V.TLSv1, V.TLSv1_1, True),
        (V.TLSv1, V.TLSv1_2, False),
        (V.TLSv1_2, V.TLSv1_2, False),
        (V.TLSv1_2, V.TLSv1_3, False),
        (V.TLSv1_3, V.TLSv1_3, False),
    ],
)
def test_the_highest_version_offered_decides(lowest: V, highest: V, old: bool) -> None:
    hello = client_hello(lowest, highest)
    assert hello[0] == 0x16
    assert offers_only_old_versions(hello) is old


def test_what_cannot_be_read_is_left_to_the_tls_library() -> None:
    old = client_hello(V.TLSv1, V.TLSv1_1)
    for data in (old[:5], old[: len(old) // 2], b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", b"\x16"):
        assert offers_only_old_versions(data) is False, data
