"""One request as the proxy port's server parsed it, and its body as it streams in.

The head is kept as the parser produced it: raw header lines (bytes, original case, every
line), the raw target split into path and query. Anything decoded (the header multidict, the
parsed query, the percent-decoded path) is built only when a step asks for it, once.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote

from multidict import CIMultiDictProxy, MultiDict, MultiDictProxy

from gateway.http.flow import HIGH_WATER, ChunkQueue
from gateway.http.head_rules import split_authority
from gateway.http.headers import decode, decoded_lines
from gateway.http.paths import normal_path

if TYPE_CHECKING:
    from gateway.http.server_connection import ServerConnection


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class RequestBody(ChunkQueue):
    """The body of one request: chunks as the parser produced them, read by whoever forwards it.

    `read` returns the next chunk, b"" at the end, and raises ConnectionResetError when the
    client went away before the body was complete, MalformedRequest when the body was malformed.
    """

    __slots__ = ("_connection", "_continue")

    def __init__(self, connection: ServerConnection | None, expect_continue: bool) -> None:
        ChunkQueue.__init__(self)
        self._connection = connection
        # The client waits for a 100 Continue before it sends the body: it goes out when the
        # body is first wanted, so a request refused earlier never has its body sent at all.
        self._continue = expect_continue
        self.done = connection is None

    def _drained(self) -> None:
        if self._connection is not None:
            self._connection.resume_body()

    async def _more(self) -> None:
        connection = self._connection
        assert connection is not None  # NO_BODY is always done
        if self._continue:
            self._continue = False
            connection.send_interim(_CONTINUE)
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            # Only its own: a reader that gave up (a request sent again after a stale upstream
            # connection abandons its first read) must not clear that of a reader after it.
            if self._waiter is waiter:
                self._waiter = None

    def feed(self, chunk: bytes) -> bool:
        """Queue a chunk (called by the connection); true when over the high-water mark."""
        return self.push(chunk) > HIGH_WATER


# The body of every request that announced none: always at its end.
NO_BODY = RequestBody(None, False)


class Request:
    """One request head, its body stream, and the connection that must answer it."""

    __slots__ = (
        "_headers",
        "_path",
        "_query",
        "authority",
        "body_exists",
        "connection",
        "content",
        "keep_alive",
        "method",
        "query_string",
        "raw_headers",
        "raw_path",
        "remote",
        "request_id_header",
        "scheme",
        "target",
        "upgrade",
        "version",
    )

    def __init__(
        self,
        connection: ServerConnection,
        method: str,
        target: bytes,
        raw_headers: list[tuple[bytes, bytes]],
        version: str,
        keep_alive: bool,
        content: RequestBody,
        request_id_header: bytes | None = None,
    ) -> None:
        self.connection = connection
        self.method = method
        self.target = decode(target)
        # The host the request names in its target (absolute-form), which wins over its Host
        # header (RFC 9112 3.2.2); None in the usual origin-form.
        self.authority: bytes | None = None
        if target[:1] == b"/":
            # No '#' here: the server refuses a target with a fragment.
            raw_path, _, self.query_string = self.target.partition("?")
        else:
            # Absolute-form (`GET http://host/path`), or anything the routes will not match.
            raw_path, self.query_string, self.authority = _split_absolute(target)
        # Normalised (gateway/http/paths.py): the routes and the upstream read the same path.
        self.raw_path = normal_path(raw_path) if raw_path[:1] == "/" else raw_path
        self.raw_headers = raw_headers
        self.version = version
        self.keep_alive = keep_alive
        self.content = content
        self.body_exists = content is not NO_BODY
        self.request_id_header = request_id_header  # the first X-Request-ID line, as sent
        self.remote = connection.remote
        self.scheme = connection.scheme
        self.upgrade = False  # asks to switch protocols (Connection: upgrade and Upgrade)
        self._headers: CIMultiDictProxy[str] | None = None
        self._query: MultiDictProxy[str] | None = None
        self._path: str | None = None

    def header(self, name: bytes) -> str | None:
        """The first line of header `name` (lower-case bytes), without building the multidict."""
        for line in self.raw_headers:
            if line[0].lower() == name:
                return decode(line[1])
        return None

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        headers = self._headers
        if headers is None:
            headers = self._headers = decoded_lines(self.raw_headers)
        return headers

    @property
    def query(self) -> MultiDictProxy[str]:
        query = self._query
        if query is None:
            query = self._query = MultiDictProxy(
                MultiDict(parse_qsl(self.query_string, keep_blank_values=True))
            )
        return query

    @property
    def path(self) -> str:
        """The path, percent-decoded (for the access log; routing uses `raw_path`)."""
        path = self._path
        if path is None:
            raw = self.raw_path
            path = self._path = unquote(raw, errors="surrogateescape") if "%" in raw else raw
        return path


def _split_absolute(target: bytes) -> tuple[str, str, bytes | None]:
    """An absolute-form target's path, query and authority (host, and port when given).

    Split here rather than by httptools' URL parser, which refuses hosts the server's head
    rules let through (`my_service`, `a~b`, sub-delimiters, an empty port): the whole target
    was then routed as a path, a 404 for a request whose path has a route."""
    _, separator, rest = target.partition(b"://")
    if not separator:
        return decode(target), "", None  # `*`, or anything the routes will not match
    authority, remainder = split_authority(rest)
    path, _, query = remainder.partition(b"?")
    return decode(path or b"/"), decode(query), _normal_authority(authority) or None


def _normal_authority(authority: bytes) -> bytes:
    """`host[:port]` in its normal form (RFC 3986 6.2.3): no empty port, no leading zeros."""
    host, colon, port = authority.rpartition(b":")
    if not colon or b"]" in port:  # no port (an IPv6 literal's colons are inside brackets)
        return authority
    if not port.isdigit():
        return host
    return b"%b:%d" % (host, int(port))
