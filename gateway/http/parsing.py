"""What both connections (the server's, to clients; the client's, to upstreams) need around
httptools: the bound on a head, and the parsers a connection keeps when it has no use for one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import httptools

# A head (request or status line, header lines) may not be larger than this: llhttp itself has
# no bound, and neither a client nor an upstream may make the gateway buffer without end.
HEAD_LIMIT = 64 * 1024


# Why a head whose Transfer-Encoding is not `only_chunked` is refused, either way.
OTHER_CODING = "it has a Transfer-Encoding other than chunked"


def only_chunked(coding: bytes) -> bool:
    """Whether a Transfer-Encoding value is `chunked` alone. Another coding (`gzip`,
    `gzip, chunked`) would reach the other side de-chunked but still coded, with nothing to say
    so: the gateway re-frames bodies and cannot pass a coding on (RFC 9112 6.1)."""
    return coding.strip().lower() == b"chunked"


def recorded_request_line(parser: httptools.HttpRequestParser, url: bytes) -> tuple[str, str]:
    """The method and path that the record of a request which could not be read names (its
    request line was): the path without its query or fragment, where a key may be."""
    method = parser.get_method().decode("ascii", "replace")
    path = url.partition(b"?")[0].partition(b"#")[0].decode("utf-8", "surrogateescape")
    return method, path


class _NoCallbacks:
    """The protocol of the closed parsers: it has no callbacks, and they are never fed."""


# A parser holds its protocol's callbacks and the protocol its parser: a reference cycle, which
# only the cyclic collector would free once the connection is gone. A reload pauses the
# collector and then freezes what is alive (gateway/reload.py), so every connection closed
# during a reload would stay for good (17 objects, ~4 KB each). A closed connection (and one
# not yet connected) holds one of these instead, and is freed by reference counting.
CLOSED_REQUEST_PARSER = httptools.HttpRequestParser(_NoCallbacks())
CLOSED_RESPONSE_PARSER = httptools.HttpResponseParser(_NoCallbacks())


@functools.lru_cache(maxsize=256)
def parser_knows_method(method: str) -> bool:
    """Whether a request with `method` gets past the parser at all: llhttp knows a fixed set
    (the standard methods, WebDAV's and the like) and refuses any other token, `GETT` too,
    before a route is looked at."""
    parser = httptools.HttpRequestParser(_NoCallbacks())
    try:
        parser.feed_data(method.encode("ascii") + b" / HTTP/1.1\r\nHost: x\r\n\r\n")
    except httptools.HttpParserUpgrade:
        return True  # CONNECT: the parser hands the connection over
    except (httptools.HttpParserError, UnicodeEncodeError):
        return False
    return True


class BodyOnly:
    """The protocol of a parser that reads one request body on its own: what the server's
    connection does for a body httptools left unread after an upgrade request's head. Its
    own head is made up (the request's framing lines); of a chunked body it passes on the chunk
    events and the trailer fields, which the connection bounds as for any other body."""

    __slots__ = (
        "_in_body",
        "_on_trailer",
        "on_body",
        "on_chunk_complete",
        "on_chunk_header",
        "on_message_complete",
    )

    def __init__(
        self,
        on_body: Callable[[bytes], None],
        on_complete: Callable[[], None],
        *,
        on_chunk_header: Callable[[], None],
        on_chunk_complete: Callable[[], None],
        on_trailer: Callable[[bytes, bytes], None],
    ) -> None:
        self.on_body = on_body
        self.on_message_complete = on_complete
        self.on_chunk_header = on_chunk_header
        self.on_chunk_complete = on_chunk_complete
        self._on_trailer = on_trailer
        self._in_body = False

    def on_headers_complete(self) -> None:
        self._in_body = True  # the made-up head's lines are no trailer

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_body:
            self._on_trailer(name, value)
