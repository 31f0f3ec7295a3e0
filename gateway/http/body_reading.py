"""Reading the body of a request on a client connection, as httptools parses it.

The part of `ServerConnection` that feeds a request's body to its handler: each piece as it
comes (reading paused while the handler has not taken enough of it), the end, a chunked
body's bounds, and the body of an upgrade request, read with a parser of its own so that the
bytes after it are left to the protocol it asked for. Where a head becomes a request is
`server_connection.py`; reading heads, `head_reading.py`.
"""

from __future__ import annotations

import asyncio
import collections

import httptools

from gateway.http.chunks import ChunkBounds, ChunkEvents
from gateway.http.parsing import BodyOnly
from gateway.http.request import Request

# Heads of pipelined requests waiting for their turn before reading from the client pauses.
MAX_WAITING = 16


class BodyReader(ChunkEvents):
    """The body state of a connection and the parser callbacks that feed it; a base of
    `ServerConnection`, which sets this state up (its one place of initial values) and owns
    the parser, the transport and the turns of the requests."""

    # Of the connection.
    transport: asyncio.Transport | None
    _parser: httptools.HttpRequestParser
    _closing: bool
    _waiting: collections.deque[Request]

    # The body being read.
    _parsing: Request | None  # until its body is complete
    _chunks: ChunkBounds | None
    _body_chunked: bool
    _body_paused: bool
    _body_behind_upgrade: bool

    # The connection's (ServerConnection), or the head reader's (on_header):
    def _pause_reading(self) -> None:
        raise NotImplementedError

    def _resume_reading(self) -> None:
        raise NotImplementedError

    def _stop_reading(self) -> None:
        """Read nothing more from the client (the request's body ends the connection)."""
        raise NotImplementedError

    def data_received(self, data: bytes) -> None:
        raise NotImplementedError

    def on_header(self, name: bytes, value: bytes) -> None:
        raise NotImplementedError

    def on_body(self, body: bytes) -> None:
        if self._chunks is not None:
            self._chunks.body()
        request = self._parsing
        if request is not None and request.content.feed(body) and self.transport is not None:
            self._body_paused = True
            self._pause_reading()

    def on_message_complete(self) -> None:
        self._chunks = None
        if self._body_behind_upgrade:
            return  # only the head: the body is still to be read (`_read_body_apart`)
        request = self._parsing
        if request is not None:
            request.content.end()
            self._parsing = None
        if self._body_paused:
            # Nothing more of that body can come: a pause for it would outlast its request.
            self.resume_body()

    def _read_body_apart(self, rest: bytes) -> None:
        """Read the body of a request that asked to upgrade, from `rest` on, with a parser of
        its own framed as the request's head says. The connection ends after this request:
        what follows its body was meant for the protocol it asked for."""
        request = self._parsing
        assert request is not None
        self._closing = True
        # Bounded as any chunked body is: the client chooses this path (an Upgrade line is
        # all it takes), and reading goes on until the body ends, however long that is.
        self._chunks = ChunkBounds() if self._body_chunked else None
        framing = b"".join(
            b"%b: %b\r\n" % (name, value)
            for name, value in request.raw_headers
            if name.lower() in (b"content-length", b"transfer-encoding")
        )
        body_only = BodyOnly(
            self.on_body,
            self.body_apart_complete,
            on_chunk_header=self.on_chunk_header,
            on_chunk_complete=self.on_chunk_complete,
            on_trailer=self.on_header,  # out of the head: counted as a trailer field
        )
        self._parser = httptools.HttpRequestParser(body_only)
        self.data_received(b"PUT / HTTP/1.1\r\n" + framing + b"\r\n" + rest)

    def body_apart_complete(self) -> None:
        self._body_behind_upgrade = False
        self.on_message_complete()
        self._stop_reading()

    def resume_body(self) -> None:
        if self._body_paused:
            self._body_paused = False
            if len(self._waiting) <= MAX_WAITING:
                self._resume_reading()
