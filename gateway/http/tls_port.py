"""A connection to the proxy port when it speaks HTTPS, until its first bytes say what the
client speaks.

A TLS client's first record is its ClientHello, whose first byte is 0x16 (a handshake record);
anything else is most likely plain HTTP sent to the HTTPS port (`curl http://host:8443/`),
which nginx answers with a 400. Telling the two apart takes the connection's first read, so the
listener is a plain one and each connection begins here:

- A handshake record: the connection gets the event loop's own TLS protocol, the one
  `create_server(ssl=...)` puts under each connection, with the `ServerConnection` above it,
  and is fed the bytes read so far. From then on the transport delivers to it directly, as on
  a TLS listener: a request on a kept-alive HTTPS connection takes the same path as before.
- Anything else: a 400 written through the server's `on_request_error` (which records it) in
  plain text, and the connection closed; while the client may still be sending (a request
  body), after a lingering close (`lingering.py`), which a drain waits for.
- A handshake record whose ClientHello offers only TLS 1.0 or 1.1: a protocol_version alert,
  then the close (`client_hello.py` says why the TLS library cannot send it).
- Nothing at all: closed after `head_timeout`, as the handshake timeout did, which for a
  handshake still counts from the accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from asyncio import sslproto
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import httptools

from gateway.http.client_hello import PROTOCOL_VERSION_ALERT, offers_only_old_versions
from gateway.http.errors import PlainHttpOnTlsPort
from gateway.http.lingering import Lingering, linger
from gateway.http.parsing import recorded_request_line
from gateway.http.server_connection import ServerConnection

if TYPE_CHECKING:
    from gateway.http.server import HttpServer

__all__ = ["SHUTDOWN_TIMEOUT", "TlsPortConnection", "TlsProtocolClass", "loop_tls_protocol"]

# Seconds a TLS connection being closed waits for the client's close_notify before its socket
# goes: nginx does not wait at all; a client that answers does so within a round trip.
# (asyncio's default of 30 s held every idle keep-alive client's connection, and a drain.)
SHUTDOWN_TIMEOUT = 1.0

# RFC 8446 5.1 (and every TLS version before it): ContentType handshake(22).
_HANDSHAKE_RECORD = 0x16

# Called as (loop, app_protocol, sslcontext, waiter, server_side, server_hostname, *,
# ssl_handshake_timeout, ssl_shutdown_timeout): uvloop's and asyncio's SSLProtocol alike.
TlsProtocolClass = Callable[..., asyncio.BufferedProtocol]


def loop_tls_protocol(loop: asyncio.AbstractEventLoop) -> TlsProtocolClass:
    """The TLS protocol class `loop` itself puts under each connection of a TLS listener:
    uvloop's (its transports read into it straight from C), else asyncio's. Neither is public
    API; both have taken the same arguments since uvloop 0.15 and Python 3.11, and
    tests/integration/http/test_tls_port.py serves HTTPS through each."""
    with contextlib.suppress(ImportError):
        import uvloop

        if isinstance(loop, uvloop.Loop):
            return cast(TlsProtocolClass, uvloop.loop.SSLProtocol)  # type: ignore[attr-defined]
    return cast(TlsProtocolClass, sslproto.SSLProtocol)


class _RequestLine:
    """The parser callbacks that keep what the record of a plain HTTP request says of it:
    its target and its first X-Request-ID; and whether the request was read to its end."""

    def __init__(self) -> None:
        self.url = b""
        self.request_id: bytes | None = None
        self.complete = False

    def on_message_complete(self) -> None:
        self.complete = True

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.request_id is None and name.lower() == b"x-request-id":
            self.request_id = value.rstrip(b" \t")


class TlsPortConnection(asyncio.Protocol):
    """One connection to the TLS port until its first read: then TLS under a
    `ServerConnection`, or the 400 for plain HTTP."""

    def __init__(self, server: HttpServer, context: ssl.SSLContext) -> None:
        self._server = server
        self._context = context
        self._transport: asyncio.Transport | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._lingering: Lingering | None = None  # after the 400 to plain HTTP

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike.
        self._transport = cast(asyncio.Transport, transport)
        server = self._server
        self._deadline = server.loop.time() + server.head_timeout
        self._timer = server.loop.call_at(self._deadline, self._timed_out)
        server.undecided.add(self)

    def data_received(self, data: bytes) -> None:
        lingering = self._lingering
        if lingering is not None:
            lingering.discard(len(data))
            return
        transport = self._transport
        if transport is None:
            return
        self._forget()
        if data[0] == _HANDSHAKE_RECORD:
            if offers_only_old_versions(data):
                transport.write(PROTOCOL_VERSION_ALERT)
                transport.close()
                return
            self._start_tls(transport, data)
        else:
            self._refuse_plain_http(transport, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        if self._lingering is not None:
            self._lingering.stop()
            self._server.forget_refusal(self)
        self._transport = None

    def close(self) -> None:
        """Close a connection that has sent nothing yet, or whose lingering close after its 400
        outlasted a drain (the server is shutting down)."""
        self._forget()
        if self._lingering is not None:
            self._lingering.stop()
        if self._transport is not None:
            self._transport.close()

    def _forget(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._server.undecided.discard(self)

    def _timed_out(self) -> None:
        # Nothing arrived: neither a handshake nor a request to answer.
        self._timer = None
        self.close()

    def _start_tls(self, transport: asyncio.Transport, data: bytes) -> None:
        server = self._server
        loop = server.loop
        tls = server.tls_protocol(
            loop,
            ServerConnection(server),
            self._context,
            None,  # no waiter: the protocol closes the transport itself when a handshake fails
            True,
            None,
            # Counted from the accept, as on a TLS listener; a timer that had fired would have
            # closed the connection, but a read may come in the same loop turn.
            ssl_handshake_timeout=max(self._deadline - loop.time(), 0.001),
            ssl_shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
        transport.set_protocol(tls)
        tls.connection_made(transport)
        # What was read so far goes in as the transport hands the protocol every later read.
        rest = memoryview(data)
        while rest and not transport.is_closing():
            buffer = memoryview(tls.get_buffer(len(rest)))
            size = min(len(buffer), len(rest))
            buffer[:size] = rest[:size]
            tls.buffer_updated(size)
            rest = rest[size:]

    def _refuse_plain_http(self, transport: asyncio.Transport, data: bytes) -> None:
        started = time.time()
        # The record names the request, as for any request that could not be read: its method
        # and path (without query) and its X-Request-ID, as far as the first read holds them.
        line = _RequestLine()
        parser = httptools.HttpRequestParser(line)
        with contextlib.suppress(httptools.HttpParserError, httptools.HttpParserUpgrade):
            parser.feed_data(data)
        method = path = ""
        if line.url:
            method, path = recorded_request_line(parser, line.url)
        answer = self._server.on_request_error(
            PlainHttpOnTlsPort(), started, method, path, line.request_id
        )
        transport.write(answer)
        if line.complete:
            transport.close()
            return
        # The client may still be sending (its body): closed with those bytes unread, the
        # socket would reset the connection, and a client that reads only once its body is
        # sent (Python's http.client, requests) reported "Connection reset by peer" instead.
        self._lingering = linger(transport, self._server.loop, self._server.linger)
        if self._lingering is not None:
            self._server.refusals.add(self)
