"""One upstream answer as the gateway's HTTP client hands it on: its head, and its body as a
queue of the parser's chunks (`HttpReply`); and what its head says of the body's framing.
The connection that reads it is `client_connection.py`, its parser's callbacks `reply_reader.py`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from multidict import CIMultiDictProxy

from gateway.http.errors import ResponseBodyError
from gateway.http.flow import HIGH_WATER, ChunkQueue
from gateway.http.headers import decoded_lines

if TYPE_CHECKING:
    from gateway.http.client_connection import HttpConnection
    from gateway.http.tunnel import TunnelEnd


class HttpReply(ChunkQueue):
    """One upstream answer: its head, and its body as a queue of chunks from the parser."""

    __slots__ = (
        "_connection",
        "_headers",
        "head_only",
        "raw_headers",
        "reason",
        "status",
        "trailer_lines",
    )

    def __init__(self, connection: HttpConnection, head_only: bool) -> None:
        ChunkQueue.__init__(self)
        self._connection = connection
        self.head_only = head_only  # an answer to HEAD: no body, whatever its headers say
        self.status = 0
        self.reason = ""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        # A chunked body's trailer fields, as read (bounded as a head is), once it ended with
        # its terminator (none when it was cut short); never passed on to the client (RFC 9110
        # 6.5.1), but a hook may read them.
        self.trailer_lines: tuple[tuple[bytes, bytes], ...] = ()
        self._headers: CIMultiDictProxy[str] | None = None

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """The header lines decoded into a multidict, built when first asked for."""
        headers = self._headers
        if headers is None:
            headers = self._headers = decoded_lines(self.raw_headers)
        return headers

    def take_body(self) -> bytes:
        """The whole body of a complete answer, at once (a single chunk is not copied)."""
        assert self.done
        chunks = self._chunks
        body = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._queued = 0
        self._connection.resume()
        return body

    @property
    def at_eof(self) -> bool:
        return self.done and not self._chunks

    def _drained(self) -> None:
        self._connection.resume()

    async def _more(self) -> None:
        await self._connection.wait_for_body(self)

    def finish(self) -> None:
        self._connection.release(self)

    def keep_alive(self, value: bytes) -> None:
        """The answer's Keep-Alive value, told by whoever reads its header lines anyway (the
        proxy: `client_response_head`), so that no second look at them is needed here: after
        this answer the pool reuses the connection only as long as its `timeout=N` allows."""
        self._connection.keep_alive = value

    def switch_protocols(self, end: TunnelEnd) -> bytes:
        """After a 101: the connection goes to `end` of a tunnel (see the connection's)."""
        return self._connection.switch_protocols(end)

    def abort(self) -> None:
        self._connection.abort()

    # Called by the connection.

    def _feed(self, chunk: bytes) -> None:
        if self.push(chunk) > HIGH_WATER:
            self._connection.pause()

    def _end(self, error: str | None = None) -> None:
        if error is None:
            self.end()
        else:
            self.fail(ResponseBodyError(error))


def body_ends_at_close(reply: HttpReply) -> bool:
    """Whether the answer's body runs to the connection's close: no length, and no chunks (a
    Transfer-Encoding other than chunked never gets this far: see `only_chunked`)."""
    if reply.head_only or reply.status in (204, 304):
        return False
    headers = reply.headers
    return "Transfer-Encoding" not in headers and "Content-Length" not in headers


def announces_body(lines: list[tuple[bytes, bytes]]) -> bool:
    """Whether a response head announces body bytes: chunks, or a length above 0."""
    for name, value in lines:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            return True
        if lowered == b"content-length" and value.strip() not in (b"0", b""):
            return True
    return False


def keep_alive_timeout(value: bytes) -> int | None:
    """The `timeout=N` of a Keep-Alive value (`timeout=5, max=1000`): the seconds the upstream
    keeps an idle connection open. None when it names none, or not as a plain number of at most
    nine digits: a value that cannot be read is as good as none."""
    for parameter in value.split(b","):
        name, equals, seconds = parameter.partition(b"=")
        if equals and name.strip().lower() == b"timeout":
            seconds = seconds.strip()
            # bytes.isdigit is ASCII only; the length bound keeps int() cheap.
            return int(seconds) if seconds.isdigit() and len(seconds) <= 9 else None
    return None
