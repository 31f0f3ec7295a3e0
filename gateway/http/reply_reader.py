"""Reading an upstream's answers: the half of `HttpConnection` that httptools calls back.

httptools (llhttp, the parser of Node.js) calls `ReplyReader`'s callbacks as it parses: a
final head becomes the exchange's `HttpReply` and the body's chunks are handed on as the parser
produced them, never joined or copied again; interim answers are passed on (bounded), a 101
that was asked for hands the connection over to a tunnel, and heads and chunked bodies' size
lines and trailers are held to their limits. Writing the request, the connection's events and
its place in the pool are `client_connection.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httptools

from gateway.http.chunks import ChunkBounds, ChunkEvents
from gateway.http.headers import decode, protocols
from gateway.http.parsing import HEAD_LIMIT, OTHER_CODING, only_chunked
from gateway.http.reply import HttpReply, announces_body

__all__ = ["HEAD_TOO_LARGE", "MAX_INTERIM", "InterimHook", "ReplyReader"]

# Told of each interim (1xx) answer but 100 and 101: status, reason, raw header lines.
InterimHook = Callable[[int, bytes, list[tuple[bytes, bytes]]], None]

HEAD_TOO_LARGE = f"its response head is larger than {HEAD_LIMIT // 1024} KiB"
# Interim answers (103 Early Hints, ...) passed on per exchange; later ones are read and dropped,
# so that an upstream sending them without end cannot fill a client that does not read.
MAX_INTERIM = 8


class ReplyReader(ChunkEvents):
    """The state of the answer being read on an upstream connection, and the parser callbacks
    that build it; a base of `HttpConnection`, which owns the transport and the exchange."""

    # Set by the connection: its parser (a fresh one per connection, and after a HEAD answer),
    # the answer of the exchange under way until it is complete, and the future its final head
    # is awaited on.
    _parser: httptools.HttpResponseParser
    _reply: HttpReply | None
    _head: asyncio.Future[HttpReply] | None
    reusable: bool  # false once the upstream said close or misbehaved

    def pause(self) -> None:
        """Stop reading from the upstream (until the tunnel or the reader resumes it)."""
        raise NotImplementedError

    def _stop_timer(self) -> None:
        """The final head is in: the upstream's silence is no longer timed."""
        raise NotImplementedError

    def _init_reading(self) -> None:
        self._interim = False  # parsing a 1xx answer, which is not the final one
        self._interims = 0  # interim answers of this exchange
        self._interim_said_close = False  # one of them had `Connection: close`
        self._on_interim: InterimHook | None = None
        self._in_head = False  # a response head has begun and is not complete
        self._head_size = 0  # its status line and header lines so far
        self._head_read = 0  # bytes of reads that continued it without completing it
        self._began_in_read = False  # a message began in the read being parsed
        self._body_chunked = False  # the head being read says Transfer-Encoding: chunked
        self._chunks: ChunkBounds | None = None  # an answer's chunked body, bounded as a head
        # Its trailer fields so far: the reply's only once the body ends with its terminator.
        self._trailer_lines: list[tuple[bytes, bytes]] | None = None
        self._refusal: str | None = None  # why a callback stopped the parser
        # An exchange that asks to switch protocols: the protocols it asks for, and whether
        # the upstream's 101 switched to one of them (the connection is then a tunnel's).
        self._upgrade: frozenset[bytes] | None = None
        self._switched = False
        self._header_lines: list[tuple[bytes, bytes]] = []
        self._reason = b""

    def on_message_begin(self) -> None:
        if self._reply is None:
            # A message begun after the answer, in the read that ended it: nobody asked for
            # it. Only its start may be here (no error yet); kept in the pool, the connection
            # gave its rest to the next request, as that request's answer.
            self.reusable = False
        if self._interim_said_close:
            self._parser.set_dangerous_leniencies(lenient_keep_alive=False)
        self._header_lines = []
        self._reason = b""
        self._in_head = True
        self._head_size = 0
        self._head_read = 0
        self._began_in_read = True
        self._body_chunked = False

    def on_status(self, status: bytes) -> None:
        self._reason += status
        self._head_size += len(status)
        if self._head_size > HEAD_LIMIT:
            self._stop_head()

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            # A chunked body's trailer fields: not the answer's head (which may have left
            # already), and never passed on as if they were (RFC 9110 6.5.1); bounded, and
            # kept for the reply.
            chunks = self._chunks
            if chunks is not None:
                refusal = chunks.trailer_field(len(name) + len(value) + 4)
                if refusal is not None:
                    self._stop_head(refusal)
                lines = self._trailer_lines
                if lines is None:
                    self._trailer_lines = [(name, value)]
                else:
                    lines.append((name, value))
            return
        self._header_lines.append((name, value))
        self._head_size += len(name) + len(value) + 4
        if self._head_size > HEAD_LIMIT:
            self._stop_head()
        if len(name) == 17 and name.lower() == b"transfer-encoding":
            if not only_chunked(value):
                self._stop_head(OTHER_CODING)
            self._body_chunked = True

    def _stop_head(self, refusal: str = HEAD_TOO_LARGE) -> None:
        # Raised inside a parser callback, so httptools stops; data_received answers 502.
        self._refusal = refusal
        raise ValueError(refusal)

    def on_headers_complete(self) -> None:
        self._in_head = False
        status = self._parser.get_status_code()
        if not 100 <= status <= 599:
            # RFC 9110 15: three digits, 1xx to 5xx; a client may not know what else means.
            self._stop_head(f"its status {status} is not one of 100 to 599")
        if status < 200:
            if status == 101 and self._upgrade is not None and self._reply is not None:
                if not self._parser.should_upgrade():
                    # RFC 9110 7.8: a 101 names the protocol (Upgrade) and makes that header
                    # hop-by-hop (Connection: upgrade). Without them the parser reads on as
                    # HTTP, and the client got a 101 that ended at once, logged as a success.
                    self._stop_head("it answered 101 without Upgrade and Connection: upgrade")
                named = b",".join(v for n, v in self._header_lines if n.lower() == b"upgrade")
                if not protocols(named) <= self._upgrade:
                    # RFC 9110 7.8: a server may switch only to a protocol the request named;
                    # the client would be handed a tunnel speaking another (h2c for websocket).
                    self._stop_head("it answered 101 with a protocol the request did not ask for")
                # The switch that was asked for: this head is the final answer, and the
                # connection is the tunnel's from now on (HttpParserUpgrade follows).
                self._switched = True
                self.reusable = False
                self.pause()
            elif self._reply is None:
                # After the final answer, nobody asked: never passed on as an interim answer
                # of the exchange that already has its answer; the connection is spoilt.
                self._interim = True
                self.reusable = False
                return
            else:
                # An interim answer: passed on (103 Early Hints, ...) but 100 Continue, which
                # is between the gateway and the upstream; a 101 not asked for fails below.
                self._interim = True
                self._interims += 1
                if not self._parser.should_keep_alive():
                    # `Connection: close` on an interim answer: llhttp would refuse the final
                    # answer that must follow as data after a close. Read on, for this message
                    # only; the connection is not reused after the exchange.
                    self._parser.set_dangerous_leniencies(lenient_keep_alive=True)
                    self._interim_said_close = True
                hook = self._on_interim
                if hook is not None and status not in (100, 101) and self._interims <= MAX_INTERIM:
                    hook(status, self._reason, self._header_lines)
                return
        reply = self._reply
        if reply is None:
            self.reusable = False  # an answer nobody asked for
            return
        reply.status = status
        reply.reason = decode(self._reason)
        reply.raw_headers = self._header_lines
        if self._body_chunked and not reply.head_only:
            self._chunks = ChunkBounds()
            self._trailer_lines = None
        # No interim answer comes after the final one: kept, the hook (the client connection's)
        # would keep that connection alive for as long as this one waits in the pool.
        self._on_interim = None
        if (
            self._parser.get_http_version() == "1.0"
            and self._parser.should_keep_alive()
            and any(name.lower() == b"transfer-encoding" for name, _ in self._header_lines)
        ):
            # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding must close its
            # connection, whatever its Connection header says (its framing is in doubt).
            self.reusable = False
        self._stop_timer()
        head = self._head
        if head is not None and not head.done():
            head.set_result(reply)
        if reply.head_only:
            # llhttp cannot know the request was HEAD and would wait for the announced body;
            # a fresh parser starts clean for the next exchange, and the old one's further
            # callbacks (bytes that should not be there) find no reply and spoil the
            # connection. Bytes of that body arriving in a later read, though, would be read
            # as the next exchange's answer: a head that announces a body ends the connection.
            keep_alive = (
                self._parser.should_keep_alive()
                and not self._interim_said_close
                and not announces_body(self._header_lines)
            )
            self._parser = httptools.HttpResponseParser(self)
            self._complete(keep_alive)

    def on_body(self, body: bytes) -> None:
        if self._chunks is not None:
            self._chunks.body()
        reply = self._reply
        if reply is None or reply.head_only:
            self.reusable = False
            return
        reply._feed(body)

    def on_message_complete(self) -> None:
        if self._chunks is not None:  # a chunked body (never an interim answer's)
            self._chunks = None
            lines = self._trailer_lines
            if lines is not None:
                self._trailer_lines = None
                reply = self._reply
                if reply is not None:
                    # The terminator came: the trailer is whole. Fields read before a body was
                    # cut short (the upstream broke off, or sent too large a trailer) are not
                    # its trailer, and a cost they name was never reported (README, "Metering").
                    reply.trailer_lines = tuple(lines)
        if self._interim:
            self._interim = False
            return
        if self._reply is not None and not self._switched:
            self._complete(self._parser.should_keep_alive() and not self._interim_said_close)

    def _complete(self, keep_alive: bool) -> None:
        reply = self._reply
        self._reply = None
        if not keep_alive:
            self.reusable = False
        if reply is not None:
            reply._end()
