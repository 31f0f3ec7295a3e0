"""One keep-alive HTTP/1.1 connection to an upstream, and the answers it carries.

`HttpConnection` is an asyncio protocol that writes a pre-encoded request head (and streams the
body, with flow control), times the upstream's silences, and feeds what comes back to httptools
(llhttp, the parser of Node.js), whose callbacks (`reply_reader.py`) make the answer an
`HttpReply`. Reading from the upstream pauses while more than `flow.HIGH_WATER` bytes of an
answer wait for a slow client, so an answer of any size streams through bounded memory. The
pool that owns connections is `client.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterable
from typing import Protocol, cast

import httptools

from gateway.http.errors import (
    MalformedResponse,
    RequestBodyFailed,
    ResponseTimeout,
    ServerDisconnected,
    UpstreamError,
)
from gateway.http.flow import WriteGate, unsent_bytes
from gateway.http.headers import protocols
from gateway.http.origin import Origin
from gateway.http.parsing import CLOSED_RESPONSE_PARSER, HEAD_LIMIT
from gateway.http.reply import HttpReply, body_ends_at_close
from gateway.http.reply_reader import HEAD_TOO_LARGE, InterimHook, ReplyReader
from gateway.http.tunnel import TunnelEnd
from gateway.http.wire import CHUNK_END, LAST_CHUNK


class StaleConnection(Exception):
    """A reused connection ended before any byte of the answer: the upstream had closed it."""


class ConnectionOwner(Protocol):
    """What a connection needs of the pool it belongs to."""

    upstream: Origin
    loop: asyncio.AbstractEventLoop

    def keep(self, connection: HttpConnection) -> None:
        """Take back a connection whose exchange ended cleanly, for reuse."""

    def watch(self, connection: HttpConnection) -> None:
        """From now on the upstream has `upstream.timeout` to answer (or to take more of the
        request body, see `took_more`), else the connection is told `timed_out`."""

    def unwatch(self, connection: HttpConnection) -> None:
        """The head arrived, the body could be written on, or the exchange ended otherwise."""


class HttpConnection(ReplyReader, asyncio.Protocol):
    """One TCP connection to the upstream, carrying one exchange at a time."""

    def __init__(self, client: ConnectionOwner) -> None:
        self._client = client
        self._loop = client.loop
        # Made once connected: one that never connects (refused) is then no cycle either.
        self._parser = CLOSED_RESPONSE_PARSER
        self.transport: asyncio.Transport | None = None
        self.closed = False  # lost, or EOF seen: never to be used again
        self.reusable = True  # false once the upstream said close or misbehaved
        self.exchanges = 0  # requests sent on this connection
        self.idle_since = 0.0
        # The Keep-Alive value of the answer just read, told by its reader (HttpReply.keep_alive)
        # for the pool, which takes it when the connection comes back; and then, when that
        # value has the upstream close it sooner than the pool would, the time from which the
        # idle connection is not reused (client.KEEP_ALIVE_MARGIN). None: the pool's own limit.
        self.keep_alive: bytes | None = None
        self.reuse_until: float | None = None
        self._reply: HttpReply | None = None  # the answer being parsed, until it is complete
        self._head: asyncio.Future[HttpReply] | None = None  # until the final head arrives
        self._watched = False  # the pool's deadline applies (see ConnectionOwner.watch)
        self.deadline = 0.0
        # While a request body is sent: its bytes the upstream had not taken when last looked
        # at (see took_more). None without a body: then the upstream only has to answer.
        self._unsent_seen: int | None = None
        self._received = False  # any byte of the current answer arrived
        self._reading_paused = False
        self._writes = WriteGate(self._loop)
        self._upload: asyncio.Task[None] | None = None
        self._init_reading()
        # Once the upstream's 101 is in (see ReplyReader._switched), the connection belongs to
        # the tunnel: bytes after the head wait in `_after_switch` (reading paused) until the
        # tunnel end takes over every event.
        self._after_switch: list[bytes] = []
        self._tunnel: TunnelEnd | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self._parser = httptools.HttpResponseParser(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._reply is None:
            if self._tunnel is not None:
                self._tunnel.data_received(data)
            elif self._switched:
                self._after_switch.append(data)
            else:
                # Nothing was asked: bytes now can only be a broken or hostile upstream.
                self.reusable = False
                self.abort()
            return
        self._received = True
        continued_head = self._in_head
        self._began_in_read = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if not self._switched:
                self._fail(MalformedResponse("it switched protocols unasked"))
                return
            self._reply = None
            rest = data[upgrade.args[0] :]
            if rest:
                self._after_switch.append(rest)
        except httptools.HttpParserError:
            detail = self._refusal or "invalid HTTP response"
            self._fail(MalformedResponse(detail))
            return
        if continued_head and self._in_head and not self._began_in_read:
            # httptools buffers an unfinished header line before any callback sees it. (A read
            # that ended one head, an interim answer's, and began the next is not counted:
            # most of it may be the other head's.)
            self._head_read += len(data)
            if self._head_read > HEAD_LIMIT:
                self._fail(MalformedResponse(HEAD_TOO_LARGE))
                return
        chunks = self._chunks
        if chunks is not None and (refusal := chunks.read_ended(len(data))) is not None:
            self._fail(MalformedResponse(refusal))

    def eof_received(self) -> bool:
        self.closed = True
        if self._tunnel is not None:
            self._tunnel.eof_received()
            return False
        reply = self._reply
        if reply is not None and reply.status and body_ends_at_close(reply):
            # Neither a length nor chunks: the end of the connection is the end of the body.
            self._complete(keep_alive=False)
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self._parser = CLOSED_RESPONSE_PARSER  # nothing more is parsed; see http/parsing.py
        if self._tunnel is not None:
            self._tunnel.connection_lost()
            return
        if exc is None:
            # Closed cleanly: before the head there was no answer; after it, the body the
            # framing announced did not all come.
            error = ServerDisconnected("connection closed without an answer")
            self._fail(error, closed=True, cut="invalid or incomplete body")
        else:
            self._fail(ServerDisconnected("connection reset"), closed=True)
        self._writes.fail(ConnectionResetError("upstream connection lost"))

    def pause_writing(self) -> None:
        if self._tunnel is not None:
            self._tunnel.pause_writing()
        self._writes.pause()

    def resume_writing(self) -> None:
        if self._tunnel is not None:
            self._tunnel.resume_writing()
        self._writes.resume()

    # --- one exchange -------------------------------------------------------------------

    async def exchange(
        self,
        head: bytes,
        body: AsyncIterable[bytes] | None,
        chunked: bool,
        head_only: bool,
        on_interim: InterimHook | None = None,
        upgrade: bytes | None = None,
    ) -> HttpReply:
        """Send one request and return its answer once the head is in.

        `on_interim` is told of interim answers before it; with `upgrade` (its Upgrade value)
        the request asks to switch protocols, and a 101 answer hands the connection to
        `switch_protocols`.
        """
        transport = self.transport
        if transport is None or self.closed:
            raise StaleConnection
        self.exchanges += 1
        self._interims = 0
        self._on_interim = on_interim
        self._upgrade = None if upgrade is None else protocols(upgrade)
        self._unsent_seen = None
        reply = HttpReply(self, head_only)
        self._reply = reply
        self._received = False
        head_waiter: asyncio.Future[HttpReply] = self._loop.create_future()
        self._head = head_waiter
        try:
            transport.write(head)
            if body is None:
                self._start_timer()
            else:
                self._upload = self._loop.create_task(self._send_body(body, chunked))
            return await head_waiter
        except BaseException:
            self.abort()
            raise
        finally:
            self._head = None
            # A failed future keeps the exception it raised, whose traceback keeps this frame,
            # which keeps the future: a cycle that would hold the request (and its config)
            # until the cyclic collector came by (see gateway.reload.freeze_long_lived).
            del head_waiter

    async def _send_body(self, body: AsyncIterable[bytes], chunked: bool) -> None:
        # Whatever stops the upload early leaves a request half sent: the connection is spent.
        try:
            async for chunk in body:
                transport = self.transport
                if transport is None or transport.is_closing():
                    self.reusable = False
                    return
                if not chunk:
                    continue
                if chunked:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, CHUNK_END))
                else:
                    transport.write(chunk)
                if self._writes.paused:
                    await self._room_for_body(transport)
            if chunked and self.transport is not None:
                self.transport.write(LAST_CHUNK)
        except ConnectionError:
            # Mostly the upstream connection was lost (and _fail told the head's waiter); if
            # the body's source raised it instead, the waiter must hear of it here.
            self.reusable = False
            self._fail_head(RequestBodyFailed("the request body could not be read"))
            return
        except asyncio.CancelledError:
            self.reusable = False  # aborted
            raise
        except Exception:
            # The client's body broke (it left, or stalled): the caller knows why.
            self.reusable = False
            self._fail_head(RequestBodyFailed("the request body could not be read"))
            return
        # The body's tail may wait in the socket's send queue: while the upstream takes it,
        # waiting for its answer is no silence either.
        if self.transport is not None:
            self._unsent_seen = unsent_bytes(self.transport)
        self._start_timer()

    async def _room_for_body(self, transport: asyncio.Transport) -> None:
        """Wait until the upstream has taken enough of the body to write on. Time spent
        waiting for the body's source is not the upstream's: only this wait is timed."""
        self._unsent_seen = unsent_bytes(transport)  # a system call, but only to wait
        self._start_timer()
        try:
            await self._writes.drained()
        finally:
            self._stop_timer()

    def took_more(self) -> bool:
        """Whether the upstream took bytes of the request body since it was last looked at
        (its deadline passed): one that reads an upload slowly but steadily is given
        another allowance, as one that stopped reading (or never answers) is not."""
        seen, transport = self._unsent_seen, self.transport
        if seen is None or transport is None:
            return False
        unsent = unsent_bytes(transport)
        if unsent < seen:
            self._unsent_seen = unsent
            return True
        return False

    def _start_timer(self) -> None:
        head = self._head
        if head is not None and not head.done():
            self._watched = True
            self._client.watch(self)

    def _stop_timer(self) -> None:
        if self._watched:
            self._watched = False
            self._client.unwatch(self)

    def timed_out(self) -> None:
        self._watched = False
        # Bytes of the body still unsent (took_more just looked): the upstream stopped taking
        # them, which is what the client is told, rather than that it did not answer.
        during_upload = bool(self._unsent_seen)
        self._fail_head(ResponseTimeout(self._client.upstream.timeout, during_upload=during_upload))

    def _fail_head(self, exc: BaseException) -> None:
        head = self._head
        if head is not None and not head.done():
            head.set_exception(exc)

    def _fail(self, error: UpstreamError, *, closed: bool = False, cut: str | None = None) -> None:
        """The exchange cannot go on: tell whoever waits, and never reuse this connection.
        `error` goes to a caller still waiting for the head; a body under way is cut, told
        `cut` (else the error's own words)."""
        self.reusable = False
        self._stop_timer()
        reply, self._reply = self._reply, None
        head = self._head
        if head is not None and not head.done():
            if closed and not self._received and self.exchanges > 1:
                head.set_exception(StaleConnection())
            else:
                head.set_exception(error)
        elif reply is not None:
            reply._end(f"broke off its answer ({cut or error})")
        if not closed and self.transport is not None:
            self.transport.abort()

    # --- the reply's side ---------------------------------------------------------------

    async def wait_for_body(self, reply: HttpReply) -> None:
        """Wait for more of `reply`'s body, up to the upstream timeout."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        reply._waiter = waiter
        timeout = self._client.upstream.timeout
        timer = self._loop.call_later(timeout, self._body_stalled, reply, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            reply._waiter = None

    def _body_stalled(self, reply: HttpReply, waiter: asyncio.Future[None]) -> None:
        if waiter.done():
            return
        reply._end("stalled mid-answer")
        self.reusable = False
        self.abort()

    def switch_protocols(self, end: TunnelEnd) -> bytes:
        """Hand the switched connection to `end` of a tunnel; returns the bytes the upstream
        sent after its 101 head. Reading stays paused until the tunnel starts."""
        if not self._switched:
            raise RuntimeError("the upstream did not switch protocols")
        self._tunnel = end
        self._on_interim = None
        pending, self._after_switch = b"".join(self._after_switch), []
        if self.transport is None:
            end.connection_lost()  # gone already: the tunnel ends at once
            return b""
        end.transport = self.transport
        return pending

    def pause(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def release(self, reply: HttpReply) -> None:
        """The pool's turn: reuse the connection if the exchange ended cleanly."""
        upload = self._upload
        self._upload = None
        if (
            not reply.at_eof
            or self._reply is not None
            or not self.reusable
            or self.closed
            or (upload is not None and not upload.done())
        ):
            self.abort()
            return
        self.resume()
        self._client.keep(self)

    def abort(self) -> None:
        self.reusable = False
        self.closed = True
        upload, self._upload = self._upload, None
        if upload is not None and not upload.done():
            upload.cancel()
        if self.transport is not None:
            self.transport.abort()
