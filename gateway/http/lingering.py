"""Lingering close: ending a connection whose client may still be sending, without a reset.

An answer given before the request's body was read (a 401 or 429 to an upload, a 400 for a
malformed body, a 408) ends its connection. Were the socket closed while bytes of the client's
sit unread in its receive buffer, or arrive after, Linux would answer with a reset (RST): the
client's sends fail ("Connection reset by peer", "Broken pipe") before it reads the answer,
and many HTTP clients (Python's http.client and requests among them) report that failure
rather than the answer; a client that had not received all of the answer (a segment lost on
the way, a Windows client, which drops what it had not read) never sees it at all.

So, as nginx does: the write side is shut (FIN after the answer: the client reads the answer
to its end), then whatever the client still sends is read and dropped, never kept, until it
closes, until it sends nothing for a while, a longer while has passed since the answer, or it
sent too much (`LingerBounds`); then the connection is closed.

The bounds (`LingerBounds`): 5 s without a byte and 30 s in all are nginx's `lingering_timeout`
and `lingering_time`. A client that reads while it sends (curl, browsers, aiohttp) closes as
soon as it has the answer, and needs none of them; one that reads only after its whole body
was sent (http.client) gets the answer when what is left of its body is at most 16 MiB: more
than most API uploads, while the reading a refused client can cost the worker stays that of a
16 MiB upload (a few milliseconds of CPU on loopback; memory: one read at a time).

A TLS connection cannot shut its write side alone (asyncio's TLS transports have no write_eof;
their close, a close_notify, ends the connection, and the client's sends met a reset once its
wait of 1 s for the client's close_notify was over): it lingers all the same, without the FIN.
The client has the whole answer without it, as the answer is framed by its length; when the
lingering ends, the connection is closed (its close_notify). An answer delimited by the
connection's end (a body without a length, to an HTTP/1.0 client) cannot wait for that: on TLS,
its connection is closed at once, as before.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

__all__ = ["LINGER", "LingerBounds", "Lingering", "linger"]


@dataclass(frozen=True)
class LingerBounds:
    """How long a client still sending after its connection's last answer may go without
    sending a byte (`idle`), may go on in all (`total`), and how much it may send (`size`)."""

    idle: float = 5.0
    total: float = 30.0
    size: int = 16 * 1024 * 1024


LINGER = LingerBounds()  # the proxy port's


def linger(
    transport: asyncio.Transport,
    loop: asyncio.AbstractEventLoop,
    bounds: LingerBounds,
    close_delimited: bool = False,
) -> Lingering | None:
    """Begin the lingering close of `transport`, whose last answer was written (and ends at the
    connection's end when `close_delimited`); None (and the transport closed) where the answer
    needs the end of the connection and the write side cannot be shut alone (TLS)."""
    if close_delimited and not transport.can_write_eof():
        transport.close()
        return None
    return Lingering(transport, loop, bounds)


class Lingering:
    """The lingering close of one connection, begun once its last answer was written: the
    connection hands it what it reads (`discard`) and stops it when it is lost (`stop`)."""

    __slots__ = ("_deadline", "_idle", "_last_read", "_left", "_loop", "_timer", "_transport")

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        bounds: LingerBounds,
    ) -> None:
        self._transport = transport
        self._loop = loop
        self._idle = idle = bounds.idle
        now = loop.time()
        self._deadline = now + bounds.total
        self._last_read = now
        self._left = bounds.size
        if transport.can_write_eof():
            # Once what was written has left (the answer), the client reads a FIN after it.
            transport.write_eof()
        transport.resume_reading()
        # One timer, set again when it finds the client still sending, not one per read.
        self._timer: asyncio.TimerHandle | None = loop.call_at(
            min(now + idle, self._deadline), self._judge
        )

    def discard(self, size: int) -> None:
        """`size` more bytes were read from the client, and dropped."""
        self._last_read = self._loop.time()
        self._left -= size
        if self._left < 0:
            self._close()

    def _judge(self) -> None:
        self._timer = None
        due = min(self._last_read + self._idle, self._deadline)
        if self._loop.time() >= due:
            self._close()
        else:
            self._timer = self._loop.call_at(due, self._judge)

    def _close(self) -> None:
        self.stop()
        self._transport.close()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
