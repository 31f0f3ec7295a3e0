"""The bounds of a chunked body that httptools does not keep, a client's request's or an
upstream's answer's: each chunk's size line (extensions included) and the trailer section,
each bounded as a head is (`HEAD_LIMIT`).

httptools reports a chunk's extensions never and a trailer line only once it is whole, so an
endless one was read for as long as the client kept sending. Their bytes are counted per read
instead: a whole read spent in a size line, or after the last chunk's header, counts in full
(the reads where one begins or ends do not, an error of at most two reads), and the trailer's
whole lines are counted apart, since the read that ends the body is not.
"""

from __future__ import annotations

from gateway.http.parsing import HEAD_LIMIT

TRAILER_TOO_LARGE = f"its trailer section is over {HEAD_LIMIT} bytes"
SIZE_LINE_TOO_LARGE = f"a chunk's size line is over {HEAD_LIMIT} bytes"


class ChunkBounds:
    """One chunked body's count, from the end of its message's head (whose read is not
    counted: it began in the head) to the end of the body. Told of httptools' chunk events and
    of the end of every read; each returns the reason to refuse the request, or None."""

    __slots__ = (
        "_after_header",
        "_began_in_size_line",
        "_header_in_read",
        "_in_size_line",
        "_size_line",
        "_trailer",
        "_trailer_fields",
    )

    def __init__(self) -> None:
        self._in_size_line = True  # the first chunk's size line follows the head
        self._began_in_size_line = False  # the read being parsed did
        self._size_line = 0
        self._after_header = False  # a chunk header, and no body byte since
        self._header_in_read = False  # that header came in the read being parsed
        self._trailer = 0
        self._trailer_fields = 0

    def read_ended(self, size: int) -> str | None:
        """A read of `size` bytes was parsed."""
        refusal = None
        if self._header_in_read:
            pass  # a chunk header in this read: where a line or a trailer begins, not counted
        elif self._after_header:
            # A whole read after a chunk header without a body byte: the last chunk's trailer
            # section (a chunk of data would have given body bytes at once).
            self._trailer += size
            if self._trailer > HEAD_LIMIT:
                refusal = TRAILER_TOO_LARGE
        elif self._began_in_size_line and self._in_size_line:
            self._size_line += size
            if self._size_line > HEAD_LIMIT:
                refusal = SIZE_LINE_TOO_LARGE
        self._header_in_read = False
        self._began_in_size_line = self._in_size_line
        return refusal

    def chunk_header(self) -> None:
        self._in_size_line = False
        self._after_header = self._header_in_read = True
        self._trailer = self._trailer_fields = 0

    def chunk_complete(self) -> None:
        self._in_size_line = True  # the next chunk's (the last one's is followed by the end)
        self._size_line = 0

    def body(self) -> None:
        self._after_header = False

    def trailer_field(self, size: int) -> str | None:
        """A whole trailer line of `size` bytes was read."""
        self._trailer_fields += size
        return TRAILER_TOO_LARGE if self._trailer_fields > HEAD_LIMIT else None


class ChunkEvents:
    """httptools' chunk callbacks, told to the message's `ChunkBounds` (`_chunks`, None while
    no chunked body is read): the same for a request's body (`BodyReader`) and an answer's
    (`ReplyReader`), whose `on_body` also tells it of body bytes."""

    _chunks: ChunkBounds | None

    def on_chunk_header(self) -> None:
        if self._chunks is not None:
            self._chunks.chunk_header()

    def on_chunk_complete(self) -> None:
        if self._chunks is not None:
            self._chunks.chunk_complete()
