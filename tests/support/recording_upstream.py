"""An upstream that keeps every byte it receives, as it received it, and answers each request
it parses with a small 200: for tests of exactly what the gateway lets through."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import httptools

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Recording:
    port: int = 0
    received: bytearray = field(default_factory=bytearray)  # every connection's, in order
    requests: int = 0  # requests parsed (and answered)

    def request_lines(self) -> list[bytes]:
        """The request line of each request received, in order."""
        return [
            line
            for line in bytes(self.received).split(b"\r\n")
            if line.endswith((b" HTTP/1.1", b" HTTP/1.0"))
        ]


class _Answering:
    """The parser's protocol: a 200 as each request ends."""

    def __init__(self, recording: Recording, writer: asyncio.StreamWriter) -> None:
        self._recording = recording
        self._writer = writer

    def on_message_complete(self) -> None:
        self._recording.requests += 1
        self._writer.write(OK)


@asynccontextmanager
async def recording_upstream() -> AsyncIterator[Recording]:
    recording = Recording()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = httptools.HttpRequestParser(_Answering(recording, writer))
        try:
            with suppress(ConnectionError, httptools.HttpParserError):
                while data := await reader.read(65536):
                    recording.received += data
                    parser.feed_data(data)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    recording.port = server.sockets[0].getsockname()[1]
    try:
        yield recording
    finally:
        server.close()
        await server.wait_closed()
