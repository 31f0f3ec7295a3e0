"""Flow control shared by the protocols that stream bodies (client and upstream sides).

Writing: asyncio calls `pause_writing` when a transport's buffer passes its high-water mark and
`resume_writing` when it drains; whoever streams a body waits on `WriteGate.drained()` between
chunks so that a slow reader bounds the memory a fast writer can fill.

A transport's `unsent_bytes` tell a slow reader from one that stopped: while they shrink, the
peer is taking bytes, however slowly.

Reading: a `ChunkQueue` holds body chunks as the parser handed them over (never joined or
copied) until whoever relays them takes them; its owner pauses reading from the socket above
its high-water mark and resumes below its low one.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import fcntl
import struct
import termios

# Linux's ioctl for the bytes of a socket's send queue the peer has not acknowledged yet.
_OUTQ: int | None = getattr(termios, "TIOCOUTQ", None)


class WriteGate:
    __slots__ = ("_loop", "_waiter", "paused")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None
        self.paused = False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.wake()

    def wake(self) -> None:
        """Return a waiting `drained()` at once; `resume` does so after unpausing, the send watch
        while still paused, so that its writer stops waiting."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, error: BaseException) -> None:
        """The connection is gone: a writer waiting for room learns it."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    async def drained(self) -> None:
        """Return once the transport takes more (at once when it is not paused)."""
        if not self.paused:
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None


def unsent_bytes(transport: asyncio.Transport) -> int:
    """Bytes written to `transport` that its peer has not received yet: the transport's buffer
    and, where the system tells, the socket's send queue (a system call). A kernel queue of
    megabytes may take a slow reader longer to make room in than any write timeout, while
    it reads all along."""
    queued = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if _OUTQ is not None and sock is not None:
        try:
            answer = fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0")
        except OSError:
            return queued
        queued += struct.unpack("i", answer)[0]
    return queued


# A body queue holding more than HIGH_WATER bytes pauses reading from its source's socket;
# read down to LOW_WATER, it lets the source send more.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class ChunkQueue:
    """Body chunks between a parser's callbacks and the task that relays them.

    Subclasses say how to wait for more (`_more`) and what to do when the reader has taken the
    queue down to `LOW_WATER` (`_drained`: resume reading from the socket, typically).
    """

    __slots__ = ("_chunks", "_error", "_queued", "_waiter", "done")

    def __init__(self) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0  # bytes in _chunks
        self._waiter: asyncio.Future[None] | None = None  # a reader waiting for more
        self._error: BaseException | None = None  # why the rest will never come
        self.done = False  # the whole body has arrived

    @property
    def error(self) -> BaseException | None:
        """Why the rest will never come, when that is known already."""
        return self._error

    def push(self, chunk: bytes) -> int:
        """Queue a chunk; the bytes queued now."""
        self._chunks.append(chunk)
        self._queued += len(chunk)
        self._wake()
        return self._queued

    def pop(self) -> bytes | None:
        """The oldest chunk, or None when none is queued (then `done` or `_error` say why)."""
        if not self._chunks:
            return None
        chunk = self._chunks.popleft()
        self._queued -= len(chunk)
        return chunk

    async def read(self) -> bytes:
        """The next chunk; b"" once the body is complete; raises why the rest will never come."""
        while True:
            chunk = self.pop()
            if chunk is not None:
                if self._queued <= LOW_WATER:
                    self._drained()
                return chunk
            if self.done:
                return b""
            if self._error is not None:
                # A copy: the one kept here, once raised, would hold its traceback, whose
                # frames hold this queue (a cycle only the cyclic collector frees, which a
                # reload's gc.freeze made permanent, body chunks and connection with it).
                raise copy.copy(self._error)
            await self._more()

    async def until_complete(self) -> None:
        """Return once the whole body is queued; raises why it never will be. Only for a body
        known to fit under HIGH_WATER: past it the source pauses, and the end never comes."""
        while not self.done:
            if self._error is not None:
                raise copy.copy(self._error)  # a copy, as in read()
            await self._more()

    def peek_all(self) -> bytes:
        """Every chunk queued, as one, left in the queue: joined once, so that a read or a
        take after it hands the same bytes on without copying them again."""
        chunks = self._chunks
        if len(chunks) > 1:
            whole = b"".join(chunks)
            chunks.clear()
            chunks.append(whole)
        return chunks[0] if chunks else b""

    def _drained(self) -> None:
        """The reader took the queue down to the low-water mark."""

    async def _more(self) -> None:
        """Return once a chunk, the end or an error has arrived."""
        raise NotImplementedError

    def end(self) -> None:
        self.done = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
