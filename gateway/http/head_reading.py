"""Reading the head of a request on a client connection, as httptools parses it.

The half of `ServerConnection` that reads heads: the request line and header lines, bounded in
size and checked as they come (the framing, Host, Expect and X-Request-ID lines noted), the
clock a head that does not arrive in one read runs against, and the answer to a head that
could not be read (too slow, malformed). Where a complete head becomes a request and gets its
turn is `server_connection.py`; what a head may be, `head_rules.py`.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import httptools

from gateway.http.chunks import ChunkBounds
from gateway.http.errors import HeadTimeout, RequestError
from gateway.http.head_rules import NOT_A_HOST, is_host
from gateway.http.parsing import HEAD_LIMIT, OTHER_CODING, only_chunked, recorded_request_line

if TYPE_CHECKING:
    from gateway.http.server import HttpServer

HEAD_TOO_LARGE = f"the request head is larger than {HEAD_LIMIT // 1024} KiB"

# Header names noted while parsing (framing, Expect, X-Request-ID), by their length first:
# checking the length of every name is cheaper than lower-casing every name.
_NOTED_LENGTHS = frozenset({4, 6, 12, 14, 17})

# The bytes of a header line besides its name and value: the colon and the CRLF. The space
# after the colon is optional (`a:b`); counted as well, a head of short lines under 64 KiB was
# refused as larger (a byte too many per line). The whitespace before a value llhttp drops
# unseen, so the count is never above the head's size, and may be below it by that.
_LINE_FRAMING = 3


class HeadReader:
    """The head state of a connection and the parser callbacks that fill it; a base of
    `ServerConnection`, which sets this state up (its one place of initial values) and owns
    the parser, the transport and the turns of the requests."""

    # Of the connection.
    transport: asyncio.Transport | None
    _server: HttpServer
    _parser: httptools.HttpRequestParser
    _busy: bool  # a handler is running
    idle_since: float | None
    _chunks: ChunkBounds | None  # a chunked body's bounds: its trailer fields come here too
    _body_behind_upgrade: bool  # an upgrade request's body, read apart

    # The head being read.
    _in_head: bool
    _url: bytes
    _header_lines: list[tuple[bytes, bytes]]
    _head_size: int  # of the request line and header lines parsed so far
    _head_received: int  # bytes of reads that continued an unfinished head
    _heads: int  # heads begun on this connection
    _head_started: float  # wall-clock time, when the head did not arrive in one read
    _head_timer: asyncio.TimerHandle | None
    _has_body: bool
    _body_chunked: bool  # the head says Transfer-Encoding: chunked
    _expect_continue: bool
    _request_id: bytes | None
    _hosts: int  # Host lines in the head
    _error_detail: str | None  # why the head was refused, for the 400

    def on_message_begin(self) -> None:
        self._in_head = True
        self._url = b""
        self._header_lines = []
        self._head_size = 0
        self._head_received = 0
        self._head_started = 0.0  # set if the head does not arrive in one read
        self._heads += 1
        self._has_body = self._body_chunked = False
        self._expect_continue = False
        self._request_id = None
        self._body_behind_upgrade = False
        self._hosts = 0  # Host lines in the head
        self.idle_since = None

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > HEAD_LIMIT:
            self._refuse_head(HEAD_TOO_LARGE)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            # A chunked body's trailer fields: never merged into the head the request was
            # judged by (RFC 9110, 6.5.1), so neither a key nor a header can arrive there.
            # Counted here as well as by the reads (data_received), which miss the read that
            # holds the last chunk's header: a 100 KB trailer sent at once got through.
            chunks = self._chunks
            if chunks is not None:
                refusal = chunks.trailer_field(len(name) + len(value) + _LINE_FRAMING)
                if refusal is not None:
                    self._refuse_head(refusal)
            return
        # Counted as sent, the whitespace after the value included: stripped first, 150 KB of
        # it arriving in one read passed for a head of a few hundred bytes.
        self._head_size += len(name) + len(value) + _LINE_FRAMING
        # llhttp drops the whitespace before a value, not the whitespace after it, which is no
        # more part of the value (RFC 9110 5.5): a key or a request id followed by a space is
        # still that key or that id.
        value = value.rstrip(b" \t")
        self._header_lines.append((name, value))
        if self._head_size > HEAD_LIMIT:
            self._refuse_head(HEAD_TOO_LARGE)
        if len(name) in _NOTED_LENGTHS:
            lowered = name.lower()
            if lowered == b"content-length":
                if value[:1] == b"0" and len(value) > 1 and value.isdigit():
                    # The line goes upstream: in the form every parser reads alike (llhttp
                    # let only digits through). `010` is 8 to a parser that takes a leading 0
                    # for octal (C's strtol with base 0), and the last 2 bytes of the body then
                    # begin the next request on that pooled connection; nginx sends `10` too.
                    value = b"%d" % int(value)
                    self._header_lines[-1] = (name, value)
                self._has_body = value.strip() not in (b"0", b"")
            elif lowered == b"transfer-encoding":
                self._has_body = self._body_chunked = True
                if not only_chunked(value):
                    self._refuse_head(OTHER_CODING)
            elif lowered == b"host":
                self._hosts += 1
                if not is_host(value):
                    self._refuse_head(NOT_A_HOST)
            elif lowered == b"expect":
                self._expect_continue = value.strip().lower() == b"100-continue"
            elif lowered == b"x-request-id" and self._request_id is None:
                self._request_id = value

    def _end_after_answer(self, transport: asyncio.Transport) -> None:
        """Close after the last answer (the connection's, which may linger first)."""
        raise NotImplementedError

    def _refuse_head(self, detail: str) -> None:
        # Raised inside a parser callback, so httptools stops; data_received answers 400.
        self._error_detail = detail
        raise ValueError(detail)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._busy or self.transport is None or self.transport.is_closing():
            return  # a pipelined head behind a running request: judged once it is done
        self._answer_alone(HeadTimeout(self._server.head_timeout))

    def _answer_alone(self, error: RequestError) -> None:
        """An answer to no request a handler saw (a slow head, a bad one): the server's
        `on_request_error` writes it (and records it), then the connection ends."""
        transport = self.transport
        assert transport is not None
        started = self._head_started if self._in_head and self._head_started else time.time()
        method = path = ""
        request_id = None
        if self._url:  # reset as each message begins: this one's
            # The request line was read (a slow or bad head after it): the record says which
            # request this was, without its query or fragment, where a key may be, and the
            # answer carries the X-Request-ID the client sent, if one was read.
            method, path = recorded_request_line(self._parser, self._url)
            request_id = self._request_id
        transport.write(self._server.on_request_error(error, started, method, path, request_id))
        self._end_after_answer(transport)
