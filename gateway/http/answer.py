"""Writing the answers of one client connection, one request at a time.

The half of `ServerConnection` that writes: an answer's head is held back to leave with its
first body bytes (one write for a whole answer), the body is framed in chunks or not, the
connection is kept alive or marked to close, and a client that takes nothing of its answers is
told apart from one that reads slowly (`_until_taken`, the one place of that rule). Reading
requests and running their handlers is `server_connection.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import TYPE_CHECKING

from gateway.http.errors import SendTimeout
from gateway.http.flow import WriteGate, unsent_bytes
from gateway.http.wire import CLOSE, KEEP_ALIVE, LAST_CHUNK, date_line, status_line

# SO_LINGER on, for 0 s: closing the socket then sends a reset (RST) and drops unsent bytes.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)

if TYPE_CHECKING:
    from gateway.http.request import Request


class AnswerWriter:
    """The answer state of a connection and the calls that write it; a base of
    `ServerConnection`, which owns the transport and decides when a new answer begins."""

    transport: asyncio.Transport | None
    _closing: bool  # close once the requests read so far are answered (set by the connection)
    _loop: asyncio.AbstractEventLoop

    # The send watch (`_until_taken`), class-level defaults: most connections never wait for
    # their client. When the wait under way began (None: no wait is bounded), how long the
    # client may take nothing, when the watch's one timer is due, and whether it judged that
    # the client stopped.
    _blocked_since: float | None = None
    _send_timeout = 0.0
    _stall_due = 0.0
    _stall_timer: asyncio.TimerHandle | None = None
    _stalled = False

    def _more_to_answer(self) -> bool:
        """Whether requests already read wait behind the one being answered."""
        return False

    def _init_answers(self, loop: asyncio.AbstractEventLoop) -> None:
        self._head: bytes | None = None  # a head waiting to leave with the first body bytes
        self._chunked = False
        self._answer_open = False
        self._answered = False
        self._close_after = False
        # The last answer's body runs to the connection's end (set with `_close_after`).
        self._close_delimited = False
        self._writes = WriteGate(loop)
        # `unsent_bytes` when a write last had to wait for the client (or it was last seen to
        # read): whether it has read anything since tells a slow reader from one that stopped.
        self._unsent_at_block = 0

    def _new_answer(self) -> None:
        """The next request in line is being answered: nothing of its answer exists yet."""
        self._answered = False
        self._answer_open = False
        self._head = None
        self._close_after = False

    def begin_answer(
        self,
        request: Request,
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
        if self._answered or (self._answer_open and self._head is None):
            raise RuntimeError("the request already has an answer")
        # An answer begun but not one byte of it sent may still be replaced (by a 500).
        if chunked:
            # Chunks for HTTP/1.1, whose connection then stays open for the next request; the
            # end of the connection for HTTP/1.0, which knows no chunks.
            chunked, close_delimited = request.version != "1.0", request.version == "1.0"
        keep_alive = (
            request.keep_alive
            and not close
            and not close_delimited
            # Closing, the connection still answers the requests it has read, the last says so.
            and (not self._closing or self._more_to_answer())
            and request.content.done
        )
        head = status_line(status, reason) + header_block
        if chunked:
            head += b"Transfer-Encoding: chunked\r\n"
        if not keep_alive:
            head += CLOSE
            self._close_after = True
            self._close_delimited = close_delimited
        elif request.version == "1.0":
            head += KEEP_ALIVE
        self._head = head + b"\r\n"
        self._chunked = chunked
        self._answer_open = True

    async def write_body(self, chunk: bytes, send_timeout: float | None = None) -> None:
        """Send a piece of the body (with the head, the first time); waits while the client
        is not reading. Raises ConnectionResetError when the client has gone, and with
        `send_timeout`, SendTimeout when it took nothing for that long (see `_until_taken`)."""
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
        if self._writes.paused:
            await self._until_taken(send_timeout)

    async def _until_taken(self, seconds: float | None) -> None:
        """Wait until the transport takes more of what was written for the client. With
        `seconds`, the rule for a client that takes nothing of its answers: raise SendTimeout
        once it received nothing of them for that long (the caller cuts the connection); one
        that received bytes, however few, gets another allowance. A slow reader behind a send
        queue of megabytes may wait that long for room (the kernel wakes a writer when half
        the queue is free) while it reads all along.

        One timer per connection, not one per wait: a streamed answer to a slow reader waits
        before nearly every chunk, and asyncio.timeout would schedule and cancel a timer each
        time. The timer judges the wait under way when it fires and sets itself again for the
        rest of that wait's allowance; with no wait under way it lapses.
        """
        self._unsent_at_block = self._unsent_bytes()  # a system call, but only to wait
        if seconds is None:
            await self._writes.drained()
            return
        now = self._loop.time()
        self._blocked_since = now
        self._send_timeout = seconds
        # A timer set for a longer allowance than this wait's would judge it too late.
        if self._stall_timer is None or self._stall_due > now + seconds:
            self._set_stall_timer(now + seconds)
        try:
            await self._writes.drained()
        finally:
            self._blocked_since = None
        if self._stalled:
            self._stalled = False
            raise SendTimeout(seconds)

    def _set_stall_timer(self, due: float) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
        self._stall_due = due
        self._stall_timer = self._loop.call_at(due, self._judge_stall)

    def _judge_stall(self) -> None:
        self._stall_timer = None
        since = self._blocked_since
        if since is None:
            return  # no write waits: the next one that must sets the timer again
        # The writer is woken to raise, not its task cancelled: a cancellation says that the
        # client went away, and telling this one apart took counting the task's cancels.
        if self._loop.time() - since >= self._send_timeout:
            if not self._read_since_blocked():
                self._stalled = True
                self._writes.wake()
                return
            since = self._blocked_since = self._loop.time()  # it reads: another allowance
        self._set_stall_timer(since + self._send_timeout)

    def _stop_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def end_answer(self, last: bytes = b"") -> None:
        """Send `last` (may be empty) and whatever ends the answer, in one write."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        if self._chunked:
            data = (b"%x\r\n%b\r\n" % (len(last), last) if last else b"") + LAST_CHUNK
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
        request: Request,
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
        """Drop the connection with a reset, not the FIN of a close: to a client that reads a
        body to the connection's end (HTTP/1.0, a body without a length), an answer cut short
        that ends in a FIN looks whole."""
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        transport.abort()

    @property
    def answer_started(self) -> bool:
        """Some of the answer may have left: a problem can no longer be sent instead."""
        return self._answered or (self._answer_open and self._head is None)

    def _read_since_blocked(self) -> bool:
        """Whether the client received any of the answer since a write last had to wait for it
        (or since the last time this said yes)."""
        unsent = self._unsent_bytes()
        if unsent < self._unsent_at_block:
            self._unsent_at_block = unsent
            return True
        return False

    def _unsent_bytes(self) -> int:
        """Bytes written for the client that it has not received yet (`flow.unsent_bytes`):
        while they shrink, the client is reading, however slowly."""
        transport = self.transport
        return 0 if transport is None else unsent_bytes(transport)

    def send_interim(self, data: bytes) -> None:
        if self.transport is not None and not self._answer_open and not self._answered:
            self.transport.write(data)
