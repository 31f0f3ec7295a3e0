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
