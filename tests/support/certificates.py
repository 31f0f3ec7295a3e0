"""Self-signed certificates for the tests, made by the `openssl` command line tool."""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path
    serial: str  # upper-case hex of even length, as ssl's getpeercert() reports serialNumber

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this certificate alone."""
        return ssl.create_default_context(cafile=str(self.cert))


def make_certificate(directory: Path, name: str = "tls", serial: int = 1) -> Certificate:
    """A self-signed P-256 certificate for 127.0.0.1 and localhost, valid for two days."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-set_serial", str(serial), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    digits = f"{serial:X}"
    return Certificate(cert, key, digits.rjust(len(digits) + len(digits) % 2, "0"))


def make_expired_certificate(directory: Path, name: str = "expired") -> Certificate:
    """A self-signed certificate for localhost valid on 1 January 2020 only."""
    directory.mkdir(parents=True, exist_ok=True)
    dates = ("20200101000000Z", "20200102000000Z")
    cert, key = make_signed_certificate(directory, name, "/CN=localhost", None, dates)
    return Certificate(cert, key, "01")


# A certificate's notBefore and notAfter as `openssl ca` takes them: YYYYMMDDHHMMSSZ.
Dates = tuple[str, str]
_OPENSSL_TIME = "%Y%m%d%H%M%SZ"


def _openssl(*arguments: str) -> None:
    subprocess.run(["openssl", *arguments], check=True, capture_output=True)


def make_signed_certificate(
    directory: Path, name: str, subject: str, issuer: tuple[Path, Path] | None, dates: Dates
) -> tuple[Path, Path]:
    """A P-256 key and a certificate for `subject` (`/O=.../CN=...`, UTF-8) signed by `issuer`
    (its certificate and key; None: by itself) for `dates`: `openssl ca`, which alone dates a
    certificate in the past or the future (`openssl req` 3.0 cannot)."""
    key, request, cert = (directory / f"{name}.{end}" for end in ("key", "csr", "crt"))
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key))
    _openssl("req", "-new", "-utf8", "-key", str(key), "-subj", subject, "-out", str(request))
    ca = directory / f"{name}-ca"
    (ca / "newcerts").mkdir(parents=True)
    (ca / "index.txt").write_text("")
    (ca / "serial").write_text("01\n")
    (ca / "ca.cnf").write_text(
        f"[ca]\ndefault_ca = this\n[this]\ndir = {ca}\ndatabase = {ca}/index.txt\n"
        f"new_certs_dir = {ca}/newcerts\nserial = {ca}/serial\ndefault_md = sha256\n"
        "policy = any\nunique_subject = no\n[any]\ncommonName = optional\n"
    )
    signer = ["-selfsign", "-keyfile", str(key)] if issuer is None else [
        "-cert", str(issuer[0]), "-keyfile", str(issuer[1])
    ]  # fmt: skip
    _openssl(
        "ca", "-batch", "-config", str(ca / "ca.cnf"), *signer, "-in", str(request),
        "-out", str(cert), "-notext", "-startdate", dates[0], "-enddate", dates[1],
    )  # fmt: skip
    return cert, key


def valid_now() -> Dates:
    """From a day ago for three days."""
    now, day = datetime.now(UTC), timedelta(days=1)
    return (now - day).strftime(_OPENSSL_TIME), (now + 2 * day).strftime(_OPENSSL_TIME)


def make_chain(directory: Path, *, leaf: Dates, intermediate: Dates) -> Certificate:
    """A certificate file as a CA hands it out: the leaf for localhost (CN=localhost), then the
    intermediate that signed it (CN=Test Intermediate CA), then the root (CN=Test Root CA,
    valid now); its `key` is the leaf's."""
    directory.mkdir(parents=True, exist_ok=True)
    root = make_signed_certificate(directory, "root", "/CN=Test Root CA", None, valid_now())
    middle = make_signed_certificate(
        directory, "intermediate", "/CN=Test Intermediate CA", root, intermediate
    )
    leaf_cert, leaf_key = make_signed_certificate(directory, "leaf", "/CN=localhost", middle, leaf)
    chain = directory / "chain.crt"
    chain.write_text("".join(path.read_text() for path in (leaf_cert, middle[0], root[0])))
    return Certificate(chain, leaf_key, "01")
