"""The proxy port's own HTTP/1.1 server (gateway.http.server) reading request bodies:
100 Continue, bodies arriving in pieces, the trailer's bound, and a body its handler left
unread.

Each test runs an `HttpServer` with a small handler of its own and sub-second timeouts, and
speaks raw HTTP to it (tests.support.raw_http): what is checked is the server's protocol
behaviour, not the gateway's request path.
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.http.request import Request
from gateway.problems import Unauthorized
from tests.support.front import answer_problem, http_server
from tests.support.raw_http import (
    TEXT,
    connected,
    echo,
    get,
    problem,
    read_reply,
    read_to_eof,
    reads_body,
)

EXPECTING_5_BYTES = (
    b"POST /up HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
)


async def test_100_continue_is_sent_only_once_the_handler_reads_the_body() -> None:
    async with http_server(echo) as (_, port), connected(port) as (reader, writer):
        writer.write(EXPECTING_5_BYTES)
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        reply = await read_reply(reader)
        assert (reply.status, reply.body) == (200, b"POST /up hello")
        assert "connection" not in reply.headers  # the body was read: the connection goes on


async def test_an_http10_expect_is_ignored() -> None:
    """RFC 9110 10.1.1: an HTTP/1.0 client knows no 100 Continue; it sends its body anyway."""
    async with http_server(echo) as (_, port), connected(port) as (reader, writer):
        writer.write(EXPECTING_5_BYTES.replace(b"HTTP/1.1", b"HTTP/1.0"))
        await asyncio.sleep(0.1)  # what a 1.0 client with an Expect does: waits a little
        writer.write(b"hello")
        first = await asyncio.wait_for(reader.readuntil(b"\r\n"), 2)
        assert first == b"HTTP/1.1 200 OK\r\n"  # the final answer, no interim one


async def test_100_continue_is_not_sent_when_the_handler_answers_without_the_body() -> None:
    async def refuse(request: Request) -> None:
        answer_problem(request, Unauthorized("no key"), "rid")

    async with http_server(refuse) as (_, port), connected(port) as (reader, writer):
        writer.write(EXPECTING_5_BYTES)
        reply = await read_reply(reader)  # the first thing on the wire is the final answer
        assert reply.status == 401
        # The unsent body would be read as the next request: only closing is safe.
        assert reply.headers["connection"] == "close"
        assert await read_to_eof(reader) == b""


@pytest.mark.parametrize(
    ("framing", "pieces"),
    [
        ("Content-Length: 11", [b"hel", b"lo w", b"orld"]),
        # Splits inside a chunk's size line and inside its data, and a separate terminator.
        ("Transfer-Encoding: chunked", [b"5\r\nhe", b"llo\r\n6", b"\r\n world\r\n", b"0\r\n\r\n"]),
    ],
    ids=["content-length", "chunked"],
)
async def test_body_sent_in_pieces_reaches_the_handler_whole(
    framing: str, pieces: list[bytes]
) -> None:
    async with http_server(echo) as (_, port), connected(port) as (reader, writer):
        writer.write(f"POST /up HTTP/1.1\r\nHost: t\r\n{framing}\r\n\r\n".encode())
        for piece in pieces:
            await asyncio.sleep(0.02)  # separate reads on the server's side
            writer.write(piece)
        reply = await read_reply(reader)
        assert reply.body == b"POST /up hello world"
        writer.write(get("/after"))  # the body's end was found exactly: the next request parses
        assert (await read_reply(reader)).body == b"GET /after "


async def test_a_trailer_section_over_64_kib_is_400() -> None:
    """The trailer is bounded as the head is: its lines are only reported once whole, so an
    endless one was read for as long as client_body let it, then called a stall (408)."""

    async with http_server(reads_body) as (_, port), connected(port) as (reader, writer):
        writer.write(
            b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"  # a trailer within bounds: read
        )
        assert (await read_reply(reader)).body == b"read"
        writer.write(
            b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Endless: "
        )
        for _ in range(10):
            await asyncio.sleep(0.01)  # reads of their own, as a trickling client sends
            writer.write(b"a" * 8192)
        reply = await read_reply(reader)
        assert reply.status == 400
        assert "trailer section is over 65536 bytes" in str(problem(reply)["detail"])


async def test_connection_goes_on_after_a_large_body_the_handler_left_unread() -> None:
    """A body over the high-water mark pauses reading; once it is complete nothing more
    of it can come, so an answer that leaves it unread must not leave reading paused."""

    async def ignore_body(request: Request) -> None:
        while not request.content.done:  # answered once the whole body is in, unread
            await asyncio.sleep(0.005)
        request.connection.respond(request, 200, "OK", TEXT, b"ignored")

    size = 256 * 1024 + 1  # the read that crosses the high-water mark also ends the body
    async with http_server(ignore_body) as (_, port), connected(port) as (reader, writer):
        writer.write(f"POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n".encode())
        writer.write(b"x" * size)
        reply = await read_reply(reader)
        assert (reply.status, reply.body) == (200, b"ignored")
        assert "connection" not in reply.headers  # the body was complete: keep-alive
        writer.write(get("/after"))
        assert (await read_reply(reader)).body == b"ignored"
