"""TLS on the proxy port: server contexts built from PEM files, and a certificate that can be
renewed while the listener keeps running.

A listening socket keeps the SSLContext it was created with. To take a renewed certificate
without re-listening, the listener's context carries a server-name callback, which OpenSSL
calls for every ClientHello (with or without SNI) before it picks a certificate: it hands the
handshake to the newest context. Connections already open keep the certificate they began with.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import stat
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from gateway.http.x509 import certificate_fields

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
        # Without O_NONBLOCK, opening a named pipe waits for a writer: `gateway check`, a start
        # or a reload (and every reload after it, waiting its turn) waited for good.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as file:
            if stat.S_ISFIFO(os.fstat(file.fileno()).st_mode):
                raise TlsFileError(role, f"{path} cannot be read: it is a named pipe, not a file")
            os.set_blocking(file.fileno(), True)  # read as before, whatever else it is
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
        # NO_CERTIFICATE_ASSIGNED once the chain has loaded: the key is of another type than
        # the certificate (RSA beside ECDSA), so OpenSSL filed it where no certificate is.
        if "KEY_VALUES_MISMATCH" in reason or "NO_CERTIFICATE_ASSIGNED" in reason:
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
    """What is wrong with the dates of the certificates in the file `cert`, which
    `server_context` has loaded: the warnings for the config's load to tell (logged as this
    module's), one for each certificate out of its dates, the leaf's and the intermediates'.

    OpenSSL loads an expired certificate without a word, or one not valid yet (a clock set
    wrong, a certificate issued for later), and every client that checks certificates then
    refuses each handshake; so it does when an intermediate of the chain ran out, however new
    the leaf. Said at WARNING at each load (start, reload, `gateway check`). Not refused, as
    nginx and Envoy do not refuse it: a gateway whose certificate ran out would otherwise not
    start again after a restart, nor take any other change of its config, until the
    certificate is renewed, for clients that may not check it."""
    try:
        with open(cert, encoding="ascii", errors="replace") as file:
            pem = file.read(_MAX_PEM_BYTES)
    except OSError:
        return []  # loaded by OpenSSL already: a file this reading cannot see is no warning
    blocks = _PEM_CERTIFICATE.findall(pem)
    now = time.time()
    warnings = []
    for place, block in enumerate(blocks, 1):
        try:
            fields = certificate_fields(ssl.PEM_cert_to_DER_cert(block))
        except (ValueError, IndexError):
            continue  # nor is a certificate whose dates it cannot find
        named = "" if fields.common_name is None else f" (CN={fields.common_name})"
        which = f"the certificate file {cert}: certificate {place} of {len(blocks)}{named}"
        if fields.not_after < now:
            said = f"{which} expired on {_utc(fields.not_after)}"
        elif fields.not_before > now:
            said = f"{which} is not valid until {_utc(fields.not_before)}"
        else:
            continue
        warnings.append(f"{said}: clients that check certificates refuse it")
    return warnings


_PEM_CERTIFICATE = re.compile(
    r"-----BEGIN CERTIFICATE-----[^-]*-----END CERTIFICATE-----", re.ASCII
)


def _utc(instant: float) -> str:
    return datetime.fromtimestamp(instant, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


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
