"""A raw HTTP/1.1 client for the proxy port's own server (gateway.http.server), and the small
handlers its tests serve: the client reads each answer framed as a client must, so a test sees
exactly what the server wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from gateway.http.errors import HttpError
from gateway.http.request import Request
from tests.support.front import answer_problem, as_problem

TEXT = b"Content-Type: text/plain\r\n"


@asynccontextmanager
async def connected(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A raw client connection, closed however the test ends (uvloop cannot close a loop
    holding an open transport)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@dataclass
class Reply:
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names; the gateway's own answers repeat none
    body: bytes
    raw_body: bytes  # as framed on the wire (chunk sizes included)


async def read_reply(reader: asyncio.StreamReader, *, head_only: bool = False) -> Reply:
    """One answer, framed as a client must: Content-Length, chunked, or up to the close."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
    _, status, reason = status_line.split(" ", 2)
    headers = {n.strip().lower(): v.strip() for n, _, v in (x.partition(":") for x in lines)}
    body = raw = b""
    if head_only:
        return Reply(int(status), reason, headers, body, raw)
    if headers.get("transfer-encoding") == "chunked":
        while True:
            size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), 2)
            size = int(size_line.strip(), 16)
            data = await asyncio.wait_for(reader.readexactly(size + 2), 2)
            raw += size_line + data
            body += data[:-2]
            if size == 0:
                break
    elif "content-length" in headers:
        body = raw = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 2)
    else:
        body = raw = await read_to_eof(reader)
    return Reply(int(status), reason, headers, body, raw)


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes; a server that never closes fails the test."""
    return await asyncio.wait_for(reader.read(-1), 2)


def get(path: str = "/", *, version: str = "1.1", extra: str = "") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: t\r\n{extra}\r\n".encode()


async def echo(request: Request) -> None:
    """Answers `METHOD path body` after reading the whole body, so keep-alive can go on."""
    body = b""
    while chunk := await request.content.read():
        body += chunk
    text = f"{request.method} {request.raw_path} ".encode() + body
    request.connection.respond(request, 200, "OK", TEXT, text)


class Recording:
    """`echo`, remembering which requests reached it."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, request: Request) -> None:
        self.paths.append(request.raw_path)
        await echo(request)


def problem(reply: Reply) -> dict[str, object]:
    assert reply.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = json.loads(reply.body)
    assert body["status"] == reply.status
    return body


async def reads_body(request: Request) -> None:
    """Reads the whole body, then answers 200 "read"; a failure is answered as the gateway
    answers it."""
    try:
        while await request.content.read():
            pass
    except HttpError as error:
        answer_problem(request, as_problem(error), "rid")
        return
    request.connection.respond(request, 200, "OK", TEXT, b"read")


class Parked:
    """A handler that never answers by itself, and tells when it was cancelled."""

    def __init__(self) -> None:
        self.started, self.cancelled = asyncio.Event(), asyncio.Event()

    async def __call__(self, request: Request) -> None:
        self.started.set()
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
