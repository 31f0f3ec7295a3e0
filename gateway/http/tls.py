"""TLS on the proxy port: server contexts built from PEM files, and a certificate that can be
renewed while the listener keeps running.

A listening socket keeps the SSLContext it was created with. To take a renewed certificate
without re-listening, the listener's context carries a server-name callback, which OpenSSL
calls for every ClientHello (with or without SNI) before it picks a certificate: it hands the
handshake to the newest context. Connections already open keep the certificate they began with.
"""

from __future__ import annotations

import logging
import ssl
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

__all__ = ["CertificateSwitch", "TlsFileError", "certificate_warnings", "server_context"]

log = logging.getLogger("gateway.http.tls")

_ALPN = ["http/1.1"]


class TlsFileError(Exception):
    """A certificate or key file that cannot serve; `role` is "cert" or "key"."""

    def __init__(self, role: str, message: str) -> None:
        super().__init__(message)
        self.role = role


# A certificate chain or a key is a few KiB: a file far larger is not one (`/dev/zero` was
# read until memory ran out).
_MAX_PEM_BYTES = 1024 * 1024


def _read(path: str, role: str, marker: bytes, what: str) -> None:
    try:
        with open(path, "rb") as file:
            data = file.read(_MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise TlsFileError(role, f"{path} cannot be read: {exc.strerror or exc}") from exc
    if len(data) > _MAX_PEM_BYTES:
        raise TlsFileError(role, f"{path} is over {_MAX_PEM_BYTES} bytes: not a PEM {what}")
    if b"-----BEGIN " not in data or marker not in data:
        raise TlsFileError(role, f"{path} is not a PEM {what}")


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context for HTTP/1.1 over TLS 1.2 or 1.3 from a PEM certificate chain and key.

    Raises `TlsFileError` naming the file that cannot be read, is not PEM, or does not match.
    Says nothing of the certificate's dates: the config's load does (`certificate_warnings`),
    once, where this is called again in every process that unpickles the config.
    """
    _read(cert, "cert", b"CERTIFICATE-----", "certificate")
    _read(key, "key", b"PRIVATE KEY-----", "private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(_ALPN)
    try:
        # A password callback, even one that refuses: without it OpenSSL asks for an encrypted
        # key's passphrase on the terminal, and a gateway (or its reload) waits there for good.
        context.load_cert_chain(cert, key, password=_no_passphrase(key))
    except TlsFileError:
        raise
    except ssl.SSLError as exc:
        reason = exc.reason or ""
        if "KEY_VALUES_MISMATCH" in reason:
            raise TlsFileError("key", f"{key} does not belong to the certificate {cert}") from exc
        if "KEY" in reason or "BAD_DECRYPT" in reason or _certificate_reads(cert):
            # OpenSSL's "PEM lib" errors carry no reason: the certificate read alone tells
            # which of the two files it was.
            detail = f" ({reason})" if reason else ""
            raise TlsFileError("key", f"{key} is not a usable private key{detail}") from exc
        detail = f" ({reason})" if reason else ""
        raise TlsFileError("cert", f"{cert} is not a usable certificate{detail}") from exc
    except OSError as exc:  # removed or replaced between the checks and the load
        raise TlsFileError("cert", f"{cert} cannot be read: {exc.strerror or exc}") from exc
    return context


def certificate_warnings(cert: str) -> list[str]:
    """What is wrong with the dates of the certificate file `cert`, which `server_context`
    has loaded: the warnings for the config's load to tell (logged as this module's).

    OpenSSL loads an expired certificate without a word, and every client that checks
    certificates then refuses each handshake: said at WARNING at each load (start, reload,
    `gateway check`). Not refused, as nginx and Envoy do not refuse it: a gateway whose
    certificate ran out would otherwise not start again after a restart, nor take any other
    change of its config, until the certificate is renewed, for clients that may not check it."""
    try:
        with open(cert, encoding="ascii", errors="replace") as file:
            pem = file.read(_MAX_PEM_BYTES)
        start = pem.index("-----BEGIN CERTIFICATE-----")
        end = pem.index("-----END CERTIFICATE-----", start) + len("-----END CERTIFICATE-----")
        not_after = _not_after(ssl.PEM_cert_to_DER_cert(pem[start:end]))
    except (OSError, ValueError, IndexError):
        return []  # loaded by OpenSSL already: a date this reading cannot find is no warning
    if not_after >= time.time():
        return []
    when = datetime.fromtimestamp(not_after, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return [f"the certificate {cert} expired on {when}: clients that check certificates refuse it"]


def _der_item(data: bytes, at: int) -> tuple[int, int, int]:
    """The DER item at `at`: its tag, where its content starts and where it ends."""
    tag, length = data[at], data[at + 1]
    at += 2
    if length & 0x80:
        size = length & 0x7F
        length = int.from_bytes(data[at : at + size], "big")
        at += size
    return tag, at, at + length


def _not_after(der: bytes) -> float:
    """The notAfter of an X.509 certificate (RFC 5280 4.1), as a Unix time."""
    _, tbs, _ = _der_item(der, 0)  # Certificate
    _, at, _ = _der_item(der, tbs)  # TBSCertificate
    if der[at] == 0xA0:  # [0] version
        at = _der_item(der, at)[2]
    for _ in range(3):  # serialNumber, signature, issuer
        at = _der_item(der, at)[2]
    _, validity, _ = _der_item(der, at)
    not_before_end = _der_item(der, validity)[2]
    tag, start, end = _der_item(der, not_before_end)
    text = der[start:end].decode("ascii")
    # UTCTime has two digits for the year (RFC 5280 4.1.2.5.1: 50-99 are 19xx).
    if tag == 0x17:
        text = ("19" if int(text[:2]) >= 50 else "20") + text
    elif tag != 0x18:
        raise ValueError("not a time")
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC).timestamp()


def _no_passphrase(key: str) -> Callable[[], bytes]:
    def refuse() -> bytes:
        raise TlsFileError("key", f"{key} is encrypted: the gateway takes a key without passphrase")

    return refuse


def _certificate_reads(cert: str) -> bool:
    """Whether `cert` holds certificates OpenSSL can read (into a throwaway context)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=cert)
    except (ssl.SSLError, OSError):
        return False
    return True


class CertificateSwitch:
    """The context a TLS listener is created with; `use` swaps the certificate for new
    handshakes from then on."""

    def __init__(self, initial: ssl.SSLContext) -> None:
        self.listener_context = initial
        self.current = initial
        initial.sni_callback = self._choose
        _quiet_undecodable_server_names()

    def use(self, context: ssl.SSLContext) -> None:
        self.current = context

    def _choose(
        self, ssl_object: ssl.SSLObject | ssl.SSLSocket, _name: str | None, ctx: ssl.SSLContext
    ) -> None:
        current = self.current
        if current is not ctx:
            ssl_object.context = current


def _quiet_undecodable_server_names() -> None:
    """Python decodes a ClientHello's server name as ASCII before any server-name callback
    sees it; a name that is not (anyone can send one) fails the handshake there, as it should,
    but also writes a traceback to stderr through `sys.unraisablehook`, once per handshake.
    Those go to the log at DEBUG instead; every other unraisable error goes where it went."""
    previous = sys.unraisablehook
    if getattr(previous, "quiets_server_names", False):
        return

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if (
            isinstance(error, UnicodeDecodeError)
            and error.encoding == "ascii"
            and unraisable.object is not None
            and unraisable.object == error.object
        ):
            log.debug("TLS: refused a handshake whose server name is not ASCII: %r", error.object)
            return
        previous(unraisable)

    hook.quiets_server_names = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
