"""The proxy port's HTTP/1.1 server, at the level of asyncio protocols.

aiohttp's server costs about as much per request as all of nginx does to proxy one (request
and response objects, header multidicts, a writer, a router); the gateway needs little of
that. Here each client connection is a `ClientConnection`: httptools (llhttp) parses the
requests, each request head becomes a `ClientRequest` and one handler task, and answers are
written straight to the transport, a head together with its body in one write when the body
is in hand.

What it adds to plain HTTP/1.1 keep-alive, as the contract asks (§2 timeouts, §4, §7):

- `client_header`: a request head that has begun must be complete in time, else 408 and the
  connection is closed. A head that arrives in one read never starts the timer at all.
- `keepalive`: an idle connection is closed after this long (swept once a second or so).
- A request the parser rejects is answered 400 problem+json and the connection closed.
- A client that goes away cancels its request's handler (the pipeline records 499).
- Pipelined requests are answered in order, one handler at a time.
- `shutdown`: idle connections close at once, busy ones after their answer, the rest are
  cut at the deadline.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import cast

import httptools

from gateway import accesslog, metrics
from gateway.client_request import NO_BODY, ClientRequest, RequestBody
from gateway.dates import date_line
from gateway.problems import PROBLEM_CONTENT_TYPE, BadRequest, GatewayProblem, RequestTimeout
from gateway.record import RequestRecord

log = logging.getLogger(__name__)

Handler = Callable[[ClientRequest], Awaitable[None]]

# A request head (request line and header lines) may not be larger than this: llhttp itself
# has no bound, and a client must not be able to make the gateway buffer without end.
HEAD_LIMIT = 64 * 1024
# Heads of pipelined requests waiting for their turn before reading from the client pauses.
_MAX_WAITING = 16

_CHUNK_END = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_CLOSE = b"Connection: close\r\n"
_KEEP_ALIVE = b"Connection: keep-alive\r\n"

# Header names whose lines decide how a request is framed, by their length first: checking
# the length of every name is cheaper than lower-casing every name.
_FRAMING_LENGTHS = frozenset({6, 14, 17})


_STATUS_LINES: dict[tuple[int, str], bytes] = {}


def status_line(status: int, reason: str) -> bytes:
    key = (status, reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        line = f"HTTP/1.1 {status} {reason}\r\n".encode("utf-8", "surrogateescape")
        if len(_STATUS_LINES) < 1024:  # reasons come from upstreams: keep the cache bounded
            _STATUS_LINES[key] = line
    return line


def encode_header_block(headers: dict[str, str]) -> bytes:
    """Header lines for the gateway's own headers (ASCII by construction)."""
    return "".join([f"{name}: {value}\r\n" for name, value in headers.items()]).encode(
        "utf-8", "surrogateescape"
    )


class HttpServer:
    """Makes a `ClientConnection` per accepted client, and keeps track of them all."""

    def __init__(self, handler: Handler, *, head_timeout: float, keepalive_timeout: float):
        self.loop = asyncio.get_running_loop()
        self.handler = handler
        self.head_timeout = head_timeout
        self.keepalive_timeout = keepalive_timeout
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self._emptied: asyncio.Event | None = None
        interval = min(1.0, max(keepalive_timeout / 4, 0.01))
        self._sweep_interval = interval
        self._sweeper: asyncio.TimerHandle | None = self.loop.call_later(interval, self._sweep)

    def __call__(self) -> ClientConnection:
        return ClientConnection(self)

    def _sweep(self) -> None:
        horizon = self.loop.time() - self.keepalive_timeout
        for connection in list(self.connections):
            connection.close_if_idle_since(horizon)
        self._sweeper = self.loop.call_later(self._sweep_interval, self._sweep)

    def forget(self, connection: ClientConnection) -> None:
        self.connections.discard(connection)
        if not self.connections and self._emptied is not None:
            self._emptied.set()

    async def shutdown(self, grace: float) -> None:
        """Close idle connections now, the others after their answer or at the deadline."""
        self.draining = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._emptied = asyncio.Event()
        for connection in list(self.connections):
            connection.close_when_done()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._emptied.wait()
        cut = [c._task for c in self.connections if c._task is not None and not c._task.done()]
        for connection in list(self.connections):
            connection.abort()
        if cut:
            # connection_lost cancels them a loop turn from now; let them record their 499s.
            await asyncio.wait(cut, timeout=1.0)


class ClientConnection(asyncio.Protocol):
    """One client connection: parses its requests, runs their handlers, writes the answers."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._loop = server.loop
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        # The request being parsed.
        self._url = b""
        self._header_lines: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._head_received = 0  # bytes of reads that continued an unfinished head
        self._heads = 0  # heads begun on this connection
        self._in_head = False
        self._has_body = False
        self._expect_continue = False
        self._parsing: ClientRequest | None = None  # until its body is complete
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = 0.0
        self._error_detail: str | None = None
        self._stopped_reading = False  # after a parse error or an upgrade: nothing more
        self._body_paused = False
        # Requests whose heads are in, oldest first; the first one's handler is running.
        self._waiting: collections.deque[ClientRequest] = collections.deque()
        self._task: asyncio.Task[None] | None = None  # see _serve
        self._waker: asyncio.Future[None] | None = None  # the task waits for a request
        self._busy = False  # a handler is running
        self.idle_since: float | None = None
        self._closing = False  # close once the current answer is done
        # The answer being written.
        self._head: bytes | None = None  # a head waiting to leave with the first body bytes
        self._chunked = False
        self._answer_open = False
        self._answered = False
        self._close_after = False
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike.
        self.transport = cast(asyncio.Transport, transport)
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
            return
        head = self._heads if self._in_head else -1  # the head this read may continue
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request asking to switch protocols was parsed and gets an ordinary answer;
            # whatever follows is not HTTP the gateway can read.
            self._stop_reading()
        except httptools.HttpParserError as exc:
            self._protocol_error(self._error_detail or str(exc) or "malformed request")
            return
        if self._in_head and self._heads == head:
            # httptools buffers an unfinished header line before any callback sees it.
            self._head_received += len(data)
            if self._head_received > HEAD_LIMIT:
                self._protocol_error(f"the request head is larger than {HEAD_LIMIT // 1024} KiB")
                return
        if self._in_head and self._head_timer is None and self.transport is not None:
            # The first bytes of a head that is not complete yet: from now on it must be.
            self._head_started = time.time()
            self._head_timer = self._loop.call_later(
                self._server.head_timeout, self._head_timed_out
            )

    def eof_received(self) -> bool:
        return False  # a client that stops sending is gone: close, cancelling its handler

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._stop_head_timer()
        self._server.forget(self)
        gone = ConnectionResetError("the client closed the connection")
        if self._parsing is not None:
            self._parsing.content.fail(gone)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_exception(gone)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    # --- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._url = b""
        self._header_lines = []
        self._head_size = 0
        self._head_received = 0
        self._heads += 1
        self._has_body = False
        self._expect_continue = False
        self.idle_since = None

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_lines.append((name, value))
        self._head_size += len(name) + len(value) + 4
        if self._head_size > HEAD_LIMIT:
            self._grow_head(0)  # raises
        if len(name) in _FRAMING_LENGTHS:
            lowered = name.lower()
            if lowered == b"content-length":
                self._has_body = value.strip() not in (b"0", b"")
            elif lowered == b"transfer-encoding":
                self._has_body = True
            elif lowered == b"expect":
                self._expect_continue = value.strip().lower() == b"100-continue"

    def _grow_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > HEAD_LIMIT:
            self._error_detail = f"the request head is larger than {HEAD_LIMIT // 1024} KiB"
            raise ValueError(self._error_detail)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._stop_head_timer()
        parser = self._parser
        content = RequestBody(self, self._expect_continue) if self._has_body else NO_BODY
        request = ClientRequest(
            self,
            parser.get_method().decode("ascii", "surrogateescape"),
            self._url,
            self._header_lines,
            parser.get_http_version(),
            parser.should_keep_alive(),
            content,
        )
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
        elif len(self._waiting) > _MAX_WAITING and self.transport is not None:
            self._pause_reading()

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        if request is not None and request.content.feed(body) and self.transport is not None:
            self._body_paused = True
            self._pause_reading()

    def on_message_complete(self) -> None:
        request = self._parsing
        if request is not None:
            request.content.end()
            self._parsing = None

    # --- handlers -----------------------------------------------------------------------

    def _begin_turn(self) -> None:
        """The request first in line gets the handler: a fresh answer state."""
        self._busy = True
        self._answered = False
        self._answer_open = False
        self._head = None
        self._close_after = False

    async def _serve(self) -> None:
        """The connection's one task: runs the handler for each request in turn.

        One task per connection rather than per request: creating a task costs more than
        waking one (asyncio registers every new task in a WeakSet). A client that goes away
        cancels it, which is how its request's handler learns of it.
        """
        handler = self._server.handler
        waiting = self._waiting
        while True:
            request = waiting[0]
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
        if self._close_after or self._closing:
            transport.close()
            return False
        if waiting:
            self._begin_turn()
            if len(waiting) <= _MAX_WAITING and not self._body_paused:
                self._resume_reading()
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

    # --- answers (for the request whose handler is running) -----------------------------

    def begin_answer(
        self,
        request: ClientRequest,
        status: int,
        reason: str,
        header_block: bytes,
        *,
        chunked: bool = False,
        close_delimited: bool = False,
        close: bool = False,
    ) -> None:
        """Prepare an answer's head; it leaves with the first body bytes or with `end_answer`.

        `header_block` holds every header line, Content-Length included when the body has
        one. `chunked`: the body will be framed in chunks here (an HTTP/1.0 client gets it
        `close_delimited` instead: pass both and this picks). `close`: close the connection
        after this answer.
        """
        if self._answer_open or self._answered:
            raise RuntimeError("the request already has an answer")
        if chunked and request.version == "1.0":
            chunked, close_delimited = False, True
        keep_alive = (
            request.keep_alive
            and not close
            and not close_delimited
            and not self._closing
            and request.content.done
        )
        head = status_line(status, reason) + header_block
        if chunked:
            head += b"Transfer-Encoding: chunked\r\n"
        if not keep_alive:
            head += _CLOSE
            self._close_after = True
        elif request.version == "1.0":
            head += _KEEP_ALIVE
        self._head = head + b"\r\n"
        self._chunked = chunked
        self._answer_open = True

    async def write_body(self, chunk: bytes) -> None:
        """Send a piece of the body (with the head, the first time); waits while the client
        is not reading. Raises ConnectionResetError when the client has gone."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        if not chunk:
            return  # in chunked framing an empty chunk would end the body
        data = b"%x\r\n%b\r\n" % (len(chunk), chunk) if self._chunked else chunk
        head = self._head
        if head is not None:
            self._head = None
            data = head + data
        transport.write(data)
        if self._write_paused:
            drained: asyncio.Future[None] = self._loop.create_future()
            self._drained = drained
            try:
                await drained
            finally:
                self._drained = None

    def end_answer(self, last: bytes = b"") -> None:
        """Send `last` (may be empty) and whatever ends the answer, in one write."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        if self._chunked:
            data = (b"%x\r\n%b\r\n" % (len(last), last) if last else b"") + _LAST_CHUNK
        else:
            data = last
        head = self._head
        if head is not None:
            self._head = None
            data = head + data
        if data:
            transport.write(data)
        self._answer_open = False
        self._answered = True

    def respond(
        self,
        request: ClientRequest,
        status: int,
        reason: str,
        header_block: bytes,
        body: bytes,
        *,
        close: bool = False,
    ) -> None:
        """A complete answer of the gateway's own, in one write."""
        header_block += date_line() + b"Content-Length: %d\r\n" % len(body)
        self.begin_answer(request, status, reason, header_block, close=close)
        self.end_answer(b"" if request.method == "HEAD" else body)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def answer_started(self) -> bool:
        """Some of the answer may have left: a problem can no longer be sent instead."""
        return self._answered or (self._answer_open and self._head is None)

    def send_interim(self, data: bytes) -> None:
        if self.transport is not None and not self._answer_open and not self._answered:
            self.transport.write(data)

    # --- flow control and closing -------------------------------------------------------

    def resume_body(self) -> None:
        if self._body_paused:
            self._body_paused = False
            if len(self._waiting) <= _MAX_WAITING:
                self._resume_reading()

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
        if not self._busy and not self._in_head and self.transport is not None:
            self.transport.close()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._busy or self.transport is None:
            return  # a pipelined head behind a running request: judged once it is done
        self._answer_alone(RequestTimeout("The request head did not arrive in time."))

    def _protocol_error(self, detail: str) -> None:
        self._stop_head_timer()
        self._stop_reading()
        if self._parsing is not None:
            self._parsing.content.fail(ConnectionResetError("the request body was malformed"))
        if not self._busy and self.transport is not None:
            self._answer_alone(BadRequest(f"The request is not valid HTTP: {detail}"))

    def _answer_alone(self, problem: GatewayProblem) -> None:
        """An answer to no request the pipeline saw (408 for a slow head, 400 for a bad one),
        recorded like any other, and the end of the connection."""
        transport = self.transport
        assert transport is not None
        started = self._head_started if self._in_head and self._head_started else time.time()
        request_id = os.urandom(16).hex()
        body = problem.body(request_id)
        head = (
            status_line(problem.status, problem.title)
            + f"Content-Type: {PROBLEM_CONTENT_TYPE}\r\nX-Request-ID: {request_id}\r\n".encode()
            + date_line()
            + b"Content-Length: %d\r\n" % len(body)
            + _CLOSE
            + b"\r\n"
        )
        record = RequestRecord(request_id, "", "", started)
        record.status, record.code = problem.status, problem.code
        record.duration = time.time() - started
        record.bytes_sent = len(body)
        metrics.observe_request(record)
        accesslog.write_access_log(record)
        transport.write(head + body)
        transport.close()
