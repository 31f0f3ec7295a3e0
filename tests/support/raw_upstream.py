"""Upstreams that write exactly the bytes a test chooses, for framing, closes and stalls that
no HTTP library would produce."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field


@dataclass
class Peer:
    """One connection to the raw upstream, as the upstream sees it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def head(self) -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 3)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


Script = Callable[[Peer], Awaitable[None]]


@dataclass
class RawUpstream:
    port: int
    connections: int = 0  # accepted so far
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # a connection ended


@asynccontextmanager
async def raw_upstream(
    script: Script, *, receive_buffer: int | None = None, max_segment: int | None = None
) -> AsyncIterator[RawUpstream]:
    """Runs `script` once per accepted connection; the connection is closed after it.

    `receive_buffer` (SO_RCVBUF) and `max_segment` (TCP_MAXSEG) are set on the listening
    socket, which its connections inherit: set before listen, a small receive buffer keeps
    the kernel from taking a body the script reads slowly, and small segments keep the
    sender's queue (sized from its segment size) from taking megabytes of it. The script's
    reader then buffers no more than twice `receive_buffer` either (its limit).
    """
    upstream = RawUpstream(port=0)
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream.connections += 1
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            with suppress(asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError):
                await script(Peer(reader, writer))
        finally:
            writer.transport.abort()
            upstream.closed.set()
            tasks.discard(task)

    listener = socket.socket()
    try:
        if receive_buffer is not None:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        if max_segment is not None:
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, max_segment)
        listener.bind(("127.0.0.1", 0))
        limit = receive_buffer if receive_buffer is not None else 2**16  # asyncio's default
        server = await asyncio.start_server(serve, sock=listener, limit=limit)
    except BaseException:
        listener.close()
        raise
    upstream.port = server.sockets[0].getsockname()[1]
    try:
        yield upstream
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def keep_answering(*answers: bytes) -> Script:
    """Answers each request head on the connection with the next of `answers`."""

    async def script(peer: Peer) -> None:
        for answer in answers:
            await peer.head()
            await peer.send(answer)
        await peer.reader.read()  # until the client closes

    return script
