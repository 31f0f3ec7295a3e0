"""The proxy port's HTTP/1.1 server, at the level of asyncio protocols.

aiohttp's server costs about as much per request as all of nginx does to proxy one (request
and response objects, header multidicts, a writer, a router); the gateway needs little of
that. Here each client connection is a `ServerConnection`: httptools (llhttp) parses the
requests, each request head becomes a `Request` and one handler task, and answers are
written straight to the transport, a head together with its body in one write when the body
is in hand.

What it adds to plain HTTP/1.1 keep-alive (README, "HTTP on the proxy port"):

- `client_header`: a request head that has begun must be complete in time, else the
  connection is answered through `on_request_error` (the gateway says 408) and closed. A
  head that arrives in one read never starts the timer at all.
- `keepalive`: an idle connection is closed after this long (swept once a second or so).
- Answers wait for the client to take the ones before: while it does not read, its
  connection stops reading requests, and one that takes nothing for `send_timeout` is cut.
- A request the parser rejects is answered through `on_request_error` (the gateway says 400)
  and the connection closed.
- A client that goes away cancels its request's handler (the pipeline records 499).
- Pipelined requests are answered in order, one handler at a time.
- An answer that ends the connection while the client may still be sending (the rest of a
  body it did not need, pipelined requests) is followed by a lingering close: the write
  side shut, then what the client sends read and dropped, within bounds (`lingering.py`),
  so that the close sends no reset that could cost the client its answer.
- `shutdown`: idle connections close at once, busy ones after their answer (lingering ones
  within their bounds), the rest are cut at the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable

from gateway.http.errors import RequestError
from gateway.http.heap import release_free_memory
from gateway.http.lingering import LINGER, LingerBounds
from gateway.http.request import Request
from gateway.http.server_connection import ServerConnection
from gateway.http.tls import CertificateSwitch
from gateway.http.tls_port import TlsPortConnection, loop_tls_protocol

__all__ = ["Handler", "HttpServer", "RequestErrorAnswer"]

Handler = Callable[[Request], Awaitable[None]]
# The complete answer (status line, headers, body) to a request no handler saw because it
# could not be read: told the error, when (time.time()) its head began, its method and
# path as far as they were read ("" if not), and its first X-Request-ID line if one was read.
RequestErrorAnswer = Callable[[RequestError, float, str, str, bytes | None], bytes]
# After this many connections accepted, the C heap's free memory is given back (see
# `gateway.http.heap`), at most once per TRIM_EVERY seconds, until a trim finds that no
# connection came since the one before: the burst is over and what it freed given back.
TRIM_AFTER_CONNECTIONS = 500
TRIM_EVERY = 5.0


class HttpServer:
    """Makes a `ServerConnection` per accepted client, and keeps track of them all."""

    def __init__(
        self,
        handler: Handler,
        *,
        on_request_error: RequestErrorAnswer,
        head_timeout: float,
        keepalive_timeout: float,
        tls: ssl.SSLContext | None = None,
        interim_drop: frozenset[bytes] = frozenset(),
        send_timeout: Callable[[], float] | None = None,
        linger: LingerBounds = LINGER,
    ):
        self.loop = asyncio.get_running_loop()
        # With TLS the listener is a plain one: each connection's first read decides between
        # TLS and a 400 for plain HTTP (`TlsPortConnection`). `renew_certificate` changes the
        # certificate of handshakes from then on, open connections keep theirs.
        self._certificates = CertificateSwitch(tls) if tls is not None else None
        self.tls_protocol = loop_tls_protocol(self.loop)
        # TLS port connections that have sent nothing yet, and those lingering after the 400
        # to plain HTTP, for `shutdown`.
        self.undecided: set[TlsPortConnection] = set()
        self.refusals: set[TlsPortConnection] = set()
        self.scheme = "https" if tls is not None else "http"
        self.handler = handler
        self.on_request_error = on_request_error
        self.head_timeout = head_timeout
        self.keepalive_timeout = keepalive_timeout
        # Seconds a client may take nothing of the answers written to it before the next
        # request is answered (asked each time: a reload may change it); default keepalive.
        self.send_timeout = send_timeout or (lambda: keepalive_timeout)
        # Header names (lower-case) an upstream's interim answer loses on its way to the client.
        self.interim_drop = interim_drop
        self.linger = linger  # bounds a client still sending after its last answer
        self.connections: set[ServerConnection] = set()
        self.draining = False
        self._emptied: asyncio.Event | None = None
        interval = min(1.0, max(keepalive_timeout / 4, 0.01))
        self._sweep_interval = interval
        self._sweeper: asyncio.TimerHandle | None = self.loop.call_later(interval, self._sweep)
        self._accepted = 0  # connections since the heap was last trimmed
        self._trims_due = False
        self._trimmed_at = self.loop.time()

    def __call__(self) -> asyncio.Protocol:
        self._accepted += 1
        certificates = self._certificates
        if certificates is None:
            return ServerConnection(self)
        return TlsPortConnection(self, certificates.listener_context)

    def renew_certificate(self, context: ssl.SSLContext) -> None:
        """Serve new handshakes with `context` from now on (ignored without TLS)."""
        if self._certificates is not None:
            self._certificates.use(context)

    def _sweep(self) -> None:
        horizon = self.loop.time() - self.keepalive_timeout
        for connection in list(self.connections):
            connection.close_if_idle_since(horizon)
        if self._accepted >= TRIM_AFTER_CONNECTIONS:
            self._trims_due = True
        now = self.loop.time()
        if self._trims_due and now - self._trimmed_at >= TRIM_EVERY:
            # A trim while the burst's connections are open gives little back: the trims go
            # on until one comes after TRIM_EVERY without a new connection.
            self._trims_due = self._accepted > 0
            self._accepted = 0
            self._trimmed_at = now
            release_free_memory()
        self._sweeper = self.loop.call_later(self._sweep_interval, self._sweep)

    def forget(self, connection: ServerConnection) -> None:
        self.connections.discard(connection)
        self._note_if_emptied()

    def forget_refusal(self, refusal: TlsPortConnection) -> None:
        self.refusals.discard(refusal)
        self._note_if_emptied()

    def _note_if_emptied(self) -> None:
        # A drain waits for the last open connection, of either kind, to be gone.
        if not self.connections and not self.refusals and self._emptied is not None:
            self._emptied.set()

    async def shutdown(self, grace: float) -> None:
        """Close idle connections now, the others after their answer or at the deadline."""
        self.draining = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._emptied = asyncio.Event()
        for undecided in list(self.undecided):
            undecided.close()
        for connection in list(self.connections):
            connection.close_when_done()
        if self.connections or self.refusals:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._emptied.wait()
        for refusal in list(self.refusals):
            refusal.close()
        cut = [c._task for c in self.connections if c._task is not None and not c._task.done()]
        for connection in list(self.connections):
            connection.abort()
        if cut:
            # connection_lost cancels them a loop turn from now; let them record their 499s.
            await asyncio.wait(cut, timeout=1.0)
