"""Self-signed certificates for the tests, made by the `openssl` command line tool."""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass
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
    """A self-signed certificate for localhost valid on 1 January 2020 only: `openssl ca`, as
    `openssl req` (3.0) cannot date a certificate in the past."""
    made = make_certificate(directory, f"{name}-request")
    ca = directory / f"{name}-ca"
    (ca / "newcerts").mkdir(parents=True)
    (ca / "index.txt").write_text("")
    (ca / "serial").write_text("01\n")
    (ca / "ca.cnf").write_text(
        f"[ca]\ndefault_ca = this\n[this]\ndir = {ca}\ndatabase = {ca}/index.txt\n"
        f"new_certs_dir = {ca}/newcerts\nserial = {ca}/serial\ndefault_md = sha256\n"
        "policy = any\n[any]\ncommonName = supplied\n"
    )
    request, cert = directory / f"{name}.csr", directory / f"{name}.crt"
    subprocess.run(
        ["openssl", "req", "-new", "-key", str(made.key), "-subj", "/CN=localhost",
         "-out", str(request)],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        ["openssl", "ca", "-batch", "-config", str(ca / "ca.cnf"), "-selfsign",
         "-keyfile", str(made.key), "-in", str(request), "-out", str(cert), "-notext",
         "-startdate", "20200101000000Z", "-enddate", "20200102000000Z"],
        check=True, capture_output=True,
    )  # fmt: skip
    return Certificate(cert, made.key, "01")
