"""Handshakes on the HTTPS proxy port of a real gateway: which TLS versions and ALPN protocols
it takes, and how quietly it closes clients that never finish one."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
import warnings
from pathlib import Path

import pytest

from tests.support.certificates import Certificate, make_certificate
from tests.support.config import worker_server_yaml, write_config
from tests.support.gateway import running_gateway
from tests.support.processes import GatewayProcess
from tests.support.sockets import free_ports

API = """
products:
  shop:
    upstream: {url: "http://127.0.0.1:9"}
    routes:
      - path: /shop/{rest:path}
"""


def _old_client(made: Certificate, version: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that speaks `version` alone (OpenSSL's security level 0 lets it offer one)."""
    client = made.client_context()
    client.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():  # deprecated versions: the point of this client
        warnings.simplefilter("ignore", DeprecationWarning)
        client.minimum_version = client.maximum_version = version
    return client


def _handshake(port: int, client: ssl.SSLContext) -> str | None:
    """Handshake with 127.0.0.1:`port`; the version agreed on."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        client.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return tls.version()


def _serving_any_version(made: Certificate) -> tuple[socket.socket, threading.Thread]:
    """A TLS server that takes every version this OpenSSL has: does the client work at all?"""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    server.load_cert_chain(made.cert, made.key)
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        with contextlib.suppress(ssl.SSLError, OSError):
            raw = listener.accept()[0]
            with server.wrap_socket(raw, server_side=True):
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["1.0", "1.1"]
)
async def test_tls_1_0_and_1_1_are_refused(tmp_path: Path, version: ssl.TLSVersion) -> None:
    made = make_certificate(tmp_path / "certs")
    client = _old_client(made, version)
    listener, thread = _serving_any_version(made)
    try:
        agreed = await asyncio.to_thread(_handshake, listener.getsockname()[1], client)
    except (ssl.SSLError, OSError) as exc:
        pytest.skip(f"this OpenSSL does not speak {version.name} as a client: {exc}")
    finally:
        listener.close()
        thread.join(5)
    assert agreed == {"TLSv1": "TLSv1", "TLSv1_1": "TLSv1.1"}[version.name]
    server = worker_server_yaml(tls=(made.cert, made.key))
    config = write_config(tmp_path / "conf", API, server=server)
    async with running_gateway(config) as gateway:
        # Told why, as nginx tells it: the alert, not a connection that just ends (which
        # the event loop's TLS protocol did, closing before OpenSSL's alert was sent).
        with pytest.raises(ssl.SSLError) as refused:
            await asyncio.to_thread(_handshake, gateway.proxy_port, client)
        assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", refused.value
        # The same port goes on serving 1.2.
        modern = made.client_context()
        assert await asyncio.to_thread(_handshake, gateway.proxy_port, modern) in (
            "TLSv1.2",
            "TLSv1.3",
        )


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [(["h2", "http/1.1"], "http/1.1"), (["http/1.1", "h2"], "http/1.1"), (["h2"], None)],
)
async def test_alpn_never_chooses_h2(
    tmp_path: Path, offered: list[str], chosen: str | None
) -> None:
    """The gateway speaks HTTP/1.1 alone: a client offering h2 gets http/1.1 or no protocol
    (and then speaks HTTP/1.1, as without ALPN), never h2."""
    made = make_certificate(tmp_path / "certs")
    server = worker_server_yaml(tls=(made.cert, made.key))
    config = write_config(tmp_path / "conf", API, server=server)
    client = made.client_context()
    client.set_alpn_protocols(offered)
    async with running_gateway(config) as gateway:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", gateway.proxy_port, ssl=client, server_hostname="localhost"
        )
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            assert ssl_object.selected_alpn_protocol() == chosen
            writer.write(b"GET /nowhere HTTP/1.1\r\nHost: localhost\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        finally:
            writer.close()
    assert head.startswith(b"HTTP/1.1 404 "), head


def _client_hello() -> bytes:
    client = ssl.create_default_context().wrap_bio(
        ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="localhost"
    )
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def _closed_after(port: int, first: bytes) -> float:
    """Connect, send `first`, read to the close; how long the gateway took to close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(first)
        started = time.monotonic()
        while client.recv(65536):
            pass
        return time.monotonic() - started


def test_clients_that_never_finish_a_handshake_are_closed_quietly(tmp_path: Path) -> None:
    """A TCP health check (nothing sent), a ClientHello cut short, a whole ClientHello with no
    answer to the server's reply, an old version's: each closed once client_header has passed
    (or at once, refused), and none leaves a line in the access log or on stderr."""
    made = make_certificate(tmp_path / "certs")
    proxy_port, admin_port = free_ports(2)
    config = write_config(
        tmp_path / "conf",
        API,
        server=(
            f"server:\n  listen: 127.0.0.1:{proxy_port}\n  admin_listen: 127.0.0.1:{admin_port}\n"
            f"  timeouts: {{client_header: 300ms}}\n"
            f"  tls: {{cert: {made.cert}, key: {made.key}}}\n"
        ),
    )
    process = GatewayProcess(config)
    try:
        process.start(proxy_port, admin_port, tls=made.client_context())
        time.sleep(0.2)  # what the start logs, logged
        stderr_at_start = process.stderr()
        hello = _client_hello()
        for first in (b"", hello[:5], hello) * 3:
            took = _closed_after(proxy_port, first)
            assert 0.25 <= took < 5, (first[:8], took)  # loose above: a busy CI box
        with pytest.raises(ssl.SSLError):
            _handshake(proxy_port, _old_client(made, ssl.TLSVersion.TLSv1))
        time.sleep(0.2)  # anything the last close would log, logged
        stderr, logged = process.stderr(), process.access_log()
    finally:
        process.close()
    assert stderr == stderr_at_start
    # The start's own requests alone (it waits for the proxy port to answer GET /).
    assert {(line["path"], line["status"]) for line in logged} <= {("/", 404)}
