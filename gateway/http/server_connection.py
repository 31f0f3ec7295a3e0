"""One client connection of the proxy port: parsing its requests and running their handlers in
turn. Reading a request's head is `head_reading.py`, its body `body_reading.py`, writing the
answers `answer.py`; the
server around it (accepting, the keep-alive sweep, shutdown) is `server.py`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import time
from typing import TYPE_CHECKING, cast

import httptools

from gateway.http.answer import AnswerWriter
from gateway.http.body_reading import MAX_WAITING, BodyReader
from gateway.http.chunks import ChunkBounds
from gateway.http.errors import MalformedRequest, RequestError, SendTimeout
from gateway.http.head_reading import HEAD_TOO_LARGE, HeadReader
from gateway.http.head_rules import head_refusal
from gateway.http.headers import interim_head
from gateway.http.lingering import Lingering, linger
from gateway.http.parsing import CLOSED_REQUEST_PARSER, HEAD_LIMIT
from gateway.http.request import NO_BODY, Request, RequestBody
from gateway.http.tunnel import TunnelEnd

if TYPE_CHECKING:
    from gateway.http.server import HttpServer

log = logging.getLogger(__name__)

# Bytes a client may send after an upgrade request while its answer is awaited (a WebSocket
# client's first frames): kept for the tunnel. Reading goes on meanwhile, so that a client that
# leaves is noticed (its request cancelled, recorded as 499); past this, reading pauses.
_AFTER_UPGRADE_LIMIT = 64 * 1024


class ServerConnection(HeadReader, BodyReader, AnswerWriter, asyncio.Protocol):
    """One client connection: parses its requests and runs their handlers in turn; the
    parser callbacks that read a head are `HeadReader`'s, those that read a body
    `BodyReader`'s, and its answers are written by the `AnswerWriter` calls it inherits."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._loop = server.loop
        # Made in connection_made: a parser holds its protocol, a cycle that connection_lost
        # breaks. On the TLS port the protocol is made when a handshake begins (tls_port.py),
        # and one whose handshake fails (times out, an old TLS version) never sees
        # connection_made nor connection_lost: the cycle was left to the collector, and a
        # reload's gc.freeze kept it for good.
        self._parser = CLOSED_REQUEST_PARSER
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.scheme = server.scheme  # "https" on a TLS listener
        # The head being read (its callbacks: http/head_reading.py), the request parsed.
        self._url = b""
        self._header_lines: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._head_received = 0  # bytes of reads that continued an unfinished head
        self._heads = 0  # heads begun on this connection
        self._in_head = False
        self._has_body = False
        self._expect_continue = False
        self._parsing: Request | None = None  # until its body is complete
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = 0.0
        self._error_detail: str | None = None
        self._stopped_reading = False  # after a parse error or an upgrade: nothing more
        # After an upgrade request: the bytes that followed its head (not HTTP), kept in case
        # the protocol switch happens; then the tunnel end every event goes to.
        self._after_upgrade = b""
        self._awaiting_switch = False  # an upgrade request's answer is awaited
        self._tunnel: TunnelEnd | None = None
        self._body_paused = False
        self._body_chunked = False  # the head being read says Transfer-Encoding: chunked (not
        # AnswerWriter._chunked, the answer's own framing)
        self._chunks: ChunkBounds | None = None  # from the end of a chunked body's head on
        # Requests whose heads are in, oldest first; the first one's handler is running.
        self._waiting: collections.deque[Request] = collections.deque()
        self._task: asyncio.Task[None] | None = None  # see _serve
        self._waker: asyncio.Future[None] | None = None  # the task waits for a request
        self._busy = False  # a handler is running
        self.idle_since: float | None = None
        self._closing = False  # close once the requests read so far are answered
        # A bad head read behind a request still being answered: answered in its turn.
        self._head_error: RequestError | None = None
        self._lingering: Lingering | None = None  # after the last answer: see _end_after_answer
        self._init_answers(self._loop)  # the answer being written: see http/answer.py

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self._parser = httptools.HttpRequestParser(self)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.remote = str(peer[0])
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._server.connections.add(self)
        if self._server.draining:
            self._closing = True
        self.idle_since = self._loop.time()

    def data_received(self, data: bytes) -> None:
        if self._stopped_reading:
            if self._lingering is not None:
                self._lingering.discard(len(data))
            elif self._tunnel is not None:
                self._tunnel.data_received(data)
            elif self._awaiting_switch:
                self._after_upgrade += data
                if len(self._after_upgrade) > _AFTER_UPGRADE_LIMIT:
                    self._pause_reading()
            return
        head = self._heads if self._in_head else -1  # the head this read may continue
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if self._body_behind_upgrade:
                self._read_body_apart(data[upgrade.args[0] :])
                return
            # The request asking to switch protocols was parsed; whatever follows is not HTTP
            # the gateway can read. Its handler either switches (see `switch_protocols`) or
            # gives an ordinary answer, after which the connection closes.
            self._after_upgrade = data[upgrade.args[0] :]
            # Not paused (unless the client sends too much): a client that goes away before
            # the answer must be noticed, as for any other request.
            self._stopped_reading = True
            self._closing = True
            self._awaiting_switch = True
            if len(self._after_upgrade) > _AFTER_UPGRADE_LIMIT:
                self._pause_reading()
        except httptools.HttpParserError as exc:
            if self._stopped_reading:
                return  # bytes after the last request this connection reads: not ours
            self._protocol_error(self._error_detail or str(exc) or "malformed request")
            return
        if self._in_head and self._heads == head:
            # httptools buffers an unfinished header line before any callback sees it.
            self._head_received += len(data)
            if self._head_received > HEAD_LIMIT:
                self._protocol_error(HEAD_TOO_LARGE)
                return
        chunks = self._chunks
        if chunks is not None and (refusal := chunks.read_ended(len(data))) is not None:
            self._protocol_error(refusal)
            return
        if self._in_head and self._head_timer is None and self.transport is not None:
            # The first bytes of a head that is not complete yet: from now on it must be.
            self._head_started = time.time()
            self._head_timer = self._loop.call_later(
                self._server.head_timeout, self._head_timed_out
            )

    def eof_received(self) -> bool:
        if self._tunnel is not None:
            self._tunnel.eof_received()
        return False  # a client that stops sending is gone: close, cancelling its handler

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._parser = CLOSED_REQUEST_PARSER  # nothing more is parsed; see http/parsing.py
        self._stop_head_timer()
        self._stop_stall_timer()
        if self._lingering is not None:
            self._lingering.stop()
        self._server.forget(self)
        tunnel = self._tunnel
        if tunnel is not None:
            # The handler waits for the tunnel to end, and records it: not a cancellation.
            tunnel.connection_lost()
            return
        gone = ConnectionResetError("the client closed the connection")
        if self._parsing is not None:
            self._parsing.content.fail(gone)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._writes.fail(gone)

    def pause_writing(self) -> None:
        if self._tunnel is not None:
            self._tunnel.pause_writing()
        self._writes.pause()

    def resume_writing(self) -> None:
        if self._tunnel is not None:
            self._tunnel.resume_writing()
        self._writes.resume()

    # --- httptools callbacks from the end of a head on -----------------------------------

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._body_chunked:
            self._chunks = ChunkBounds()
        self._stop_head_timer()
        parser = self._parser
        version = parser.get_http_version()
        method = parser.get_method()
        refusal = head_refusal(version, method, self._url, self._hosts, self._body_chunked)
        if refusal is not None:
            self._refuse_head(refusal)
        # An HTTP/1.0 client's Expect is ignored (RFC 9110 10.1.1): it knows no 100 Continue.
        expect_continue = self._expect_continue and version == "1.1"
        content = RequestBody(self, expect_continue) if self._has_body else NO_BODY
        request = Request(
            self,
            method.decode("ascii", "surrogateescape"),
            self._url,
            self._header_lines,
            version,
            parser.should_keep_alive(),
            content,
            self._request_id,
        )
        if parser.should_upgrade():
            if self._has_body:
                # A body rules the switch out (a WebSocket handshake has none; any other
                # upgrade a server may ignore, RFC 9110 7.8), and it must reach the upstream.
                # httptools takes it for the new protocol's bytes: it is read apart.
                self._body_behind_upgrade = True
            else:
                # HTTP/1.0 has no protocol switch (and no 101 to tell it): an ordinary answer.
                request.upgrade = version == "1.1"
        self._parsing = request
        self._waiting.append(request)
        if not self._busy:
            self._begin_turn()
            waker = self._waker
            if waker is not None:
                self._waker = None
                waker.set_result(None)
            elif self._task is None or self._task.done():
                self._task = self._loop.create_task(self._serve())
        elif len(self._waiting) > MAX_WAITING and self.transport is not None:
            self._pause_reading()

    # --- handlers -----------------------------------------------------------------------

    def _begin_turn(self) -> None:
        """The request first in line gets the handler: a fresh answer state."""
        self._busy = True
        self._new_answer()

    async def _serve(self) -> None:
        """The connection's one task: runs the handler for each request in turn.

        One task per connection rather than per request: creating a task costs more than
        waking one (asyncio registers every new task in a WeakSet). A client that goes away
        cancels it, which is how its request's handler learns of it.
        """
        handler = self._server.handler
        waiting = self._waiting
        try:
            while True:
                request = waiting[0]
                if self._writes.paused and not await self._answers_taken():
                    return
                try:
                    await handler(request)
                except asyncio.CancelledError:
                    return  # the client went away (or was cut at shutdown); recorded as 499
                except ConnectionError:
                    pass  # the same, noticed while writing
                except Exception:
                    log.exception("unhandled error while answering a request")
                if not self._next_turn():
                    return
                if not waiting:
                    waker: asyncio.Future[None] = self._loop.create_future()
                    self._waker = waker
                    try:
                        await waker
                    except asyncio.CancelledError:
                        return
                    finally:
                        self._waker = None
        finally:
            # The connection serves no more: the requests still queued on it point back at it
            # (request.connection), a cycle only the cyclic collector frees, and a reload's
            # gc.freeze made such cycles permanent (a soak audit: ~40 MB an hour per worker).
            waiting.clear()
            self._parsing = None

    async def _answers_taken(self) -> bool:
        """Before the next answer, while the client does not read the ones written so far:
        wait, reading no more requests, until the transport takes more; False when the
        client received nothing of them for the server's `send_timeout` (the connection is
        then cut) or has gone.

        An answer the gateway makes itself is written whole, without waiting: a client that
        pipelined requests and read none of their answers (401s, 404s, ...) had them queued
        in the worker's memory, megabytes a second for as long as it kept sending.
        """
        self._pause_reading()
        while self._writes.paused:
            try:
                await self._until_taken(self._server.send_timeout())
            except SendTimeout:
                self.abort()
                return False
            except ConnectionError:
                return False
        if len(self._waiting) <= MAX_WAITING and not self._body_paused:
            self._resume_reading()
        return True

    def _next_turn(self) -> bool:
        """After an answer: whether the connection goes on to serve another request."""
        self._busy = False
        waiting = self._waiting
        waiting.popleft()
        transport = self.transport
        if transport is None:
            return False
        if not self._answered:
            # No answer, or one cut short: only closing the connection tells the client.
            transport.abort()
            return False
        if self._close_after or (self._closing and not waiting):
            self._end_after_answer(transport)
            return False
        if waiting:
            self._begin_turn()
            if len(waiting) <= MAX_WAITING and not self._body_paused and not self._writes.paused:
                self._resume_reading()
        elif self._head_error is not None:
            self._answer_alone(self._head_error)
            return False
        elif not self._in_head:
            self.idle_since = self._loop.time()
        else:
            if self._head_timer is None:
                # A pipelined head trickling in behind the answer: now its clock runs.
                self._head_started = time.time()
                self._head_timer = self._loop.call_later(
                    self._server.head_timeout, self._head_timed_out
                )
        return True

    # --- protocol switches and interim answers -----------------------------------------

    def switch_protocols(self, request: Request, head: bytes, end: TunnelEnd) -> bytes:
        """Answer the upgrade `request` with `head` (a complete 101 head) and hand the connection
        to `end` of a tunnel; returns the bytes the client sent after its request, which the
        tunnel must deliver first. Reading stays paused until the tunnel starts."""
        if not request.upgrade or self.answer_started or self._waiting[0] is not request:
            raise RuntimeError("only an upgrade request without an answer can switch protocols")
        self._tunnel = end
        self._awaiting_switch = False
        self._pause_reading()  # until the tunnel starts
        self._answered = True
        self._answer_open = False
        self._head = None
        self._close_after = True
        pending, self._after_upgrade = self._after_upgrade, b""
        transport = self.transport
        if transport is None:
            end.connection_lost()  # gone already: the tunnel ends at once
            return b""
        end.transport = transport
        transport.write(head)
        return pending

    def relay_interim(self, status: int, reason: bytes, lines: list[tuple[bytes, bytes]]) -> None:
        """Pass an upstream's interim answer (103 Early Hints, ...) on to the client whose
        request is being answered, before the final answer; HTTP/1.0 knows no 1xx."""
        waiting = self._waiting
        if waiting and waiting[0].version != "1.0":
            self.send_interim(interim_head(status, reason, lines, self._server.interim_drop))

    # --- flow control and closing -------------------------------------------------------

    def _more_to_answer(self) -> bool:
        return len(self._waiting) > 1  # the first is the request being answered

    def _pause_reading(self) -> None:
        if self.transport is not None:
            with contextlib.suppress(RuntimeError):
                self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.transport is not None and not self._stopped_reading:
            with contextlib.suppress(RuntimeError):
                self.transport.resume_reading()

    def _stop_reading(self) -> None:
        self._stopped_reading = True
        self._closing = True
        self._pause_reading()

    def close_if_idle_since(self, horizon: float) -> None:
        since = self.idle_since
        if since is not None and since <= horizon and self.transport is not None:
            self.transport.close()

    def close_when_done(self) -> None:
        self._closing = True
        if self._busy or self._in_head or self._lingering is not None:
            return  # closed after its answer, or by the lingering close's own bounds
        if self.transport is not None:
            self.transport.close()

    def _end_after_answer(self, transport: asyncio.Transport) -> None:
        """Close the connection after its last answer; while the client may still be sending
        (the rest of a body, pipelined requests, bytes after a bad head or an upgrade
        request), linger first: a close then would reset it under the answer (lingering.py).
        A drain waits for lingering connections within its grace."""
        if self._parsing is None and not (self._in_head or self._stopped_reading or self._waiting):
            transport.close()
            return
        self._lingering = linger(transport, self._loop, self._server.linger, self._close_delimited)
        if self._lingering is not None:
            self._stopped_reading = True  # every read goes to the lingering close from now on
            self._awaiting_switch = False
            self._stop_head_timer()
            self.idle_since = None  # not idle: the keep-alive sweep leaves it alone

    def _protocol_error(self, detail: str) -> None:
        self._stop_head_timer()
        error = MalformedRequest(f"not valid HTTP: {detail}")
        if self._parsing is not None:
            # In a body: the client is still there, and its handler answers (a ConnectionError
            # would say it left, and the upload would wait for a body that cannot come).
            self._stop_reading()
            self._parsing.content.fail(error)
        elif self._busy:
            # In a head pipelined behind the requests being answered: they are answered as
            # if nothing had happened, then this 400, then the connection closes.
            self._stopped_reading = True
            self._pause_reading()
            self._head_error = error
        else:
            self._stop_reading()
            if self.transport is not None:
                self._answer_alone(error)
