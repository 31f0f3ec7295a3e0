"""A keep-alive HTTP/1.1 client for one upstream, at the level of asyncio protocols.

aiohttp's ClientSession builds a URL, a request object, header multidicts, a response object
and a stream reader per request; for a gateway that only relays bytes most of that is waste.
Here a request is one head encoded from pre-encoded parts and written to a pooled
`HttpConnection` (`client_connection.py`), which parses the answer with httptools.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Sequence

from gateway.http.client_connection import HttpConnection, StaleConnection
from gateway.http.errors import ConnectError, ConnectTimeout, ServerDisconnected
from gateway.http.origin import Origin
from gateway.http.reply import HttpReply, keep_alive_timeout
from gateway.http.reply_reader import InterimHook

__all__ = ["IDEMPOTENT", "KEEPALIVE_SECONDS", "HttpClient", "InterimHook", "ReplayableBody"]

KEEPALIVE_SECONDS = 30.0
# An upstream that says `Keep-Alive: timeout=N` closes a connection idle N seconds: one is not
# reused after N less this, so that a request rarely crosses the upstream's close on the wire
# (a 502 for one that cannot be sent again), as undici does (its keepAliveTimeoutThreshold).
KEEP_ALIVE_MARGIN = 1.0
# Keep-Alive values whose meaning a pool remembers: bounded, however many an upstream makes up.
_LIFETIMES_KEPT = 16

# Methods a request may be retried with after a stale keep-alive connection: those RFC 9110
# calls idempotent, as aiohttp's client and nginx do.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# The most of a request body kept to send it again after a stale connection (`ReplayableBody`):
# a JSON document of a PUT, not an upload.
REPLAY_LIMIT = 64 * 1024
# Methods whose requests carry no body by convention; the others say `Content-Length: 0`
# when they have none, as some servers insist on a length for them.
_BODILESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"})

_CONTENT_LENGTH = b"content-length"


def _describe_os_error(exc: BaseException | None) -> str:
    if isinstance(exc, socket.gaierror):
        return "its host name does not resolve"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return "connection failed"


class ReplayableBody:
    """A request body that can be sent again from its start, as long as no more than `limit`
    bytes of it were taken: those are kept, and an iteration begun anew gives them first, then
    the rest of `source`. `source` must go on from where an abandoned iteration stopped (each
    `__aiter__` a fresh iterator over what it has not given yet), as a body read from a queue
    does."""

    __slots__ = ("_room", "_source", "_taken", "replayable")

    def __init__(self, source: AsyncIterable[bytes], limit: int = REPLAY_LIMIT) -> None:
        self._source = source
        self._room = limit  # what may still be kept
        self._taken: list[bytes] = []  # given so far, while within the limit
        self.replayable = True

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        for chunk in tuple(self._taken):
            yield chunk
        async for chunk in self._source:
            if self.replayable:
                self._room -= len(chunk)
                if self._room >= 0:
                    self._taken.append(chunk)
                else:
                    self.replayable = False
                    self._taken.clear()
            yield chunk


class HttpClient:
    """The HTTP client of one upstream: a LIFO pool of keep-alive connections.

    The most recently used connection is reused first, so a burst's extra connections
    age out; idle ones are closed after `keepalive` seconds, or sooner when the upstream's last
    answer on one said it keeps it no longer (`Keep-Alive: timeout=N`, see KEEP_ALIVE_MARGIN).
    """

    def __init__(self, upstream: Origin, *, keepalive: float = KEEPALIVE_SECONDS) -> None:
        self.upstream = upstream
        self.loop = asyncio.get_running_loop()
        self._keepalive = keepalive
        self._idle: list[HttpConnection] = []  # most recently used last
        self._sweeper: asyncio.TimerHandle | None = None
        self._lifetimes: dict[bytes, float] = {}  # see _announced_lifetime
        # Connections waiting on their upstream (for an answer head, or to take more of a request
        # body), and one timer for the earliest deadline among them: a timer per request costs
        # more to cancel (as nearly every one is) than this.
        self._waiting: set[HttpConnection] = set()
        self._wait_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if upstream.scheme == "https" else None
        )

    async def send(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[bytes, bytes]],
        body: AsyncIterable[bytes] | None,
        *,
        on_interim: InterimHook | None = None,
        upgrade: bytes | None = None,
    ) -> HttpReply:
        """Send one request; returns once the response head is in.

        `on_interim` hears of each interim answer (1xx but 100 and 101) before that. With
        `upgrade` (its Upgrade value, which `headers` hold too) the request asks to switch
        protocols: a 101 to one of them takes the connection out of the pool with
        `HttpReply.switch_protocols`, and a 101 to another is a `MalformedResponse`.

        Raises `ConnectTimeout` or `ResponseTimeout` when no connection is made within the
        connect timeout or the upstream neither answers nor takes any of the request body for
        longer than its timeout (waiting for `body` itself is not counted), `ConnectError`,
        `ServerDisconnected` or `MalformedResponse` when the connection is refused or reset or
        the answer is not HTTP, `RequestBodyFailed` when `body` fails; lets `CancelledError`
        through after closing the connection. `target` is the request target (percent-encoding
        untouched), `headers` the complete header lines, Host included; a body without a
        Content-Length line is sent chunked. An idempotent request whose kept-alive connection
        turns out closed before any byte of the answer is sent again on a fresh one, once, if
        it has no body or a `ReplayableBody` still replayable.
        """
        head, chunked = self._encode_head(method, target, headers, body is not None)
        retry = method in IDEMPOTENT and (body is None or isinstance(body, ReplayableBody))
        connection = self._idle_connection()
        while True:
            if connection is None:
                connection = await self._connect()
            try:
                return await connection.exchange(
                    head, body, chunked, method == "HEAD", on_interim, upgrade
                )
            except StaleConnection:
                # The upstream closed a kept-alive connection as the request went out. Only
                # a request that can be sent again unchanged and harmlessly is: an idempotent
                # method, and no body or one that can be replayed whole; once, and then on a
                # fresh connection.
                if not retry or (isinstance(body, ReplayableBody) and not body.replayable):
                    raise ServerDisconnected("connection closed without an answer") from None
                retry, connection = False, None

    def _encode_head(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[bytes, bytes]],
        has_body: bool,
    ) -> tuple[bytes, bool]:
        # The lines joined in C (map of bytes.join) rather than concatenated line by line in
        # Python: ~30% fewer instructions per head (bench/PROFILE.md, "Session 3").
        parts = [
            method.encode("ascii") + b" " + target.encode("utf-8", "surrogateescape"),
            b" HTTP/1.1\r\n",
        ]
        if headers:
            parts += (b"\r\n".join(map(b": ".join, headers)), b"\r\n")
        chunked = False
        if has_body or method not in _BODILESS:
            # Only these need to know whether the client gave a length.
            has_length = any(name.lower() == _CONTENT_LENGTH for name, _ in headers)
            chunked = has_body and not has_length
            if chunked:
                parts.append(b"Transfer-Encoding: chunked\r\n")
            elif not has_body and not has_length:
                parts.append(b"Content-Length: 0\r\n")
        parts.append(b"\r\n")
        return b"".join(parts), chunked

    def _idle_connection(self) -> HttpConnection | None:
        idle = self._idle
        while idle:
            connection = idle.pop()
            if not connection.closed and connection.reusable:
                if connection.reuse_until is None:
                    return connection
                # The sweep may come later than the end the upstream's Keep-Alive set.
                if self.loop.time() < connection.reuse_until:
                    connection.reuse_until = None  # its next answer says anew
                    return connection
            connection.abort()
        return None

    async def _connect(self) -> HttpConnection:
        upstream = self.upstream
        connection = HttpConnection(self)
        try:
            async with asyncio.timeout(upstream.connect_timeout):
                await self.loop.create_connection(
                    lambda: connection,
                    upstream.host,
                    upstream.port,
                    ssl=self._ssl,
                    server_hostname=upstream.host if self._ssl is not None else None,
                )
        except TimeoutError as exc:
            raise ConnectTimeout(upstream.connect_timeout) from exc
        except ssl.SSLError as exc:
            # Why, as Envoy says it too: "certificate verify failed: self-signed certificate"
            # is what an operator needs to see (a private CA goes in SSL_CERT_FILE).
            why = exc.reason or ""
            if isinstance(exc, ssl.SSLCertVerificationError):
                why = f"certificate verify failed: {exc.verify_message}"
            raise ConnectError(
                f"TLS handshake failed ({why})" if why else "TLS handshake failed"
            ) from exc
        except OSError as exc:
            raise ConnectError(_describe_os_error(exc)) from exc
        return connection

    # --- called by connections ----------------------------------------------------------

    def keep(self, connection: HttpConnection) -> None:
        if self._closed:
            connection.abort()
            return
        connection.idle_since = self.loop.time()
        if connection.keep_alive is not None:
            value, connection.keep_alive = connection.keep_alive, None  # its next answer says anew
            lifetime = self._lifetimes.get(value)
            if lifetime is None:
                lifetime = self._announced_lifetime(value)
            if lifetime < self._keepalive:
                if lifetime <= 0:
                    connection.abort()  # timeout=0 or 1: gone before it could be reused
                    return
                connection.reuse_until = connection.idle_since + lifetime
                if self._sweeper is None:
                    self._sweeper = self.loop.call_later(lifetime, self._sweep)
        self._idle.append(connection)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self._keepalive, self._sweep)

    def _announced_lifetime(self, value: bytes) -> float:
        """How long a connection may wait idle by the Keep-Alive value of its last answer: its
        `timeout=N` less KEEP_ALIVE_MARGIN, at most the pool's own limit; a value without a
        readable timeout changes nothing. Remembered for a few values, as an upstream tends to
        say the same on every answer."""
        timeout = keep_alive_timeout(value)
        lifetime = self._keepalive
        if timeout is not None and timeout - KEEP_ALIVE_MARGIN < lifetime:
            lifetime = timeout - KEEP_ALIVE_MARGIN
        if len(self._lifetimes) < _LIFETIMES_KEPT:
            self._lifetimes[value] = lifetime
        return lifetime

    def watch(self, connection: HttpConnection) -> None:
        connection.deadline = self.loop.time() + self.upstream.timeout
        self._waiting.add(connection)
        if self._wait_timer is None:
            self._wait_timer = self.loop.call_at(connection.deadline, self._check_waiting)

    def unwatch(self, connection: HttpConnection) -> None:
        self._waiting.discard(connection)
        if self._closed and not self._waiting and self._wait_timer is not None:
            # Retired (or closed) with nothing left to time: its timer would hold it.
            self._wait_timer.cancel()
            self._wait_timer = None

    def _check_waiting(self) -> None:
        self._wait_timer = None
        # The loop's clock has millisecond steps: a timer may fire a hair before its time.
        now = self.loop.time() + 0.001
        late = [connection for connection in self._waiting if connection.deadline <= now]
        for connection in late:
            if connection.took_more():
                # It takes the request body, however slowly: not silent, another allowance.
                connection.deadline = now + self.upstream.timeout
            else:
                self._waiting.discard(connection)
                connection.timed_out()
        if self._waiting:
            earliest = min(connection.deadline for connection in self._waiting)
            self._wait_timer = self.loop.call_at(earliest, self._check_waiting)

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.loop.time()
        kept: list[HttpConnection] = []
        next_expiry = now + self._keepalive
        for connection in self._idle:
            expiry = connection.reuse_until
            if expiry is None:
                expiry = connection.idle_since + self._keepalive
            if connection.closed or expiry <= now:
                connection.abort()
            else:
                kept.append(connection)
                next_expiry = min(next_expiry, expiry)
        self._idle = kept
        if kept:
            self._sweeper = self.loop.call_later(max(next_expiry - now, 0.05), self._sweep)

    def retire(self) -> None:
        """No longer the client of a config being served: requests under way finish, their
        timeouts still running, and each connection is closed as it comes back (`keep`); the
        idle ones now. Nothing is left for the client to hold once those requests are done."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if not self._waiting and self._wait_timer is not None:
            self._wait_timer.cancel()
            self._wait_timer = None
        for connection in self._idle:
            connection.abort()
        self._idle.clear()

    async def close(self) -> None:
        """`retire`, and no more timeouts for requests under way: the process is stopping.
        Connections still carrying an answer are aborted when it is finished (see keep)."""
        self.retire()
        if self._wait_timer is not None:
            self._wait_timer.cancel()
            self._wait_timer = None
