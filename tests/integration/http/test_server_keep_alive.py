"""The proxy port's own HTTP/1.1 server (gateway.http.server) keeping connections alive:
requests on one connection and pipelined ones answered in order, answers a client does not
read, and the keep-alive timeout.

Each test runs an `HttpServer` with a small handler of its own and sub-second timeouts, and
speaks raw HTTP to it (tests.support.raw_http): what is checked is the server's protocol
behaviour, not the gateway's request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from gateway.http.request import Request
from tests.support.front import http_server
from tests.support.raw_http import (
    TEXT,
    connected,
    echo,
    get,
    problem,
    read_reply,
    read_to_eof,
)


async def test_keep_alive_answers_two_requests_on_one_connection() -> None:
    async with http_server(echo) as (_, port), connected(port) as (reader, writer):
        for path in ("/one", "/two"):
            writer.write(get(path))
            reply = await read_reply(reader)
            assert (reply.status, reply.body) == (200, f"GET {path} ".encode())
            assert "connection" not in reply.headers  # HTTP/1.1 keeps alive by default


async def test_http10_without_keep_alive_is_told_close_and_closed() -> None:
    async with http_server(echo) as (_, port), connected(port) as (reader, writer):
        writer.write(get("/old", version="1.0"))
        reply = await read_reply(reader)
        assert reply.status == 200
        assert reply.headers["connection"] == "close"
        assert await read_to_eof(reader) == b""


async def test_http10_asking_keep_alive_stays_open_and_says_so() -> None:
    async with http_server(echo) as (_, port), connected(port) as (reader, writer):
        for path in ("/a", "/b"):  # the second answer proves the connection stayed open
            writer.write(get(path, version="1.0", extra="Connection: keep-alive\r\n"))
            reply = await read_reply(reader)
            assert reply.body == f"GET {path} ".encode()
            # An HTTP/1.0 client closes unless told otherwise.
            assert reply.headers["connection"] == "keep-alive"


async def test_pipelined_requests_are_answered_in_order() -> None:
    async def slow_first(request: Request) -> None:
        if request.raw_path == "/1":
            await asyncio.sleep(0.1)  # were the others run alongside, they would overtake it
        request.connection.respond(request, 200, "OK", TEXT, request.raw_path.encode())

    async with http_server(slow_first) as (_, port), connected(port) as (reader, writer):
        writer.write(get("/1") + get("/2") + get("/3"))
        bodies = [(await read_reply(reader)).body for _ in range(3)]
        assert bodies == [b"/1", b"/2", b"/3"]


@pytest.mark.parametrize(
    "bad",
    [
        b"GET /x HTTP/9.9\r\nHost: t\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET /x HTTP/1.1\r\nNoColon\r\n\r\n",
    ],
    ids=["version", "garbage", "header"],
)
async def test_a_bad_head_pipelined_behind_good_ones_gets_its_400_in_turn(bad: bytes) -> None:
    """The requests before it are answered as if nothing had happened (keep-alive: more
    answers follow), then its 400, then the close; it was dropped without a word."""
    async with http_server(echo) as (_, port), connected(port) as (reader, writer):
        writer.write(get("/1") + get("/2") + bad)
        for path in ("/1", "/2"):
            reply = await read_reply(reader)
            assert (reply.status, reply.body) == (200, f"GET {path} ".encode())
            assert "connection" not in reply.headers
        reply = await read_reply(reader)
        assert reply.status == 400 and problem(reply)["code"] == "bad_request"
        assert reply.headers["connection"] == "close"
        assert await read_to_eof(reader) == b""


@pytest.mark.parametrize("chunked_answer", [True, False])
async def test_a_head_read_while_an_answer_streams_leaves_its_framing_alone(
    chunked_answer: bool,
) -> None:
    """The parser's note that a request head says `Transfer-Encoding: chunked` and the answer's
    own chunked framing were one attribute: a pipelined head read while an answer streamed
    switched that answer's framing half-way (its next pieces framed or not framed anew)."""

    async def streamed(request: Request) -> None:
        connection = request.connection
        if request.raw_path == "/2":
            connection.respond(request, 200, "OK", TEXT, b"second")
            return
        length = b"" if chunked_answer else b"Content-Length: 6\r\n"
        connection.begin_answer(request, 200, "OK", TEXT + length, chunked=chunked_answer)
        await connection.write_body(b"abc")
        await asyncio.sleep(0.2)  # the next head arrives meanwhile
        await connection.write_body(b"def")
        connection.end_answer()

    second = (
        b"POST /2 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        if not chunked_answer
        else get("/2")
    )
    async with http_server(streamed) as (_, port), connected(port) as (reader, writer):
        writer.write(get("/1"))
        await asyncio.sleep(0.1)
        writer.write(second)
        first = await read_reply(reader)
        assert (first.status, first.body) == (200, b"abcdef")
        assert (await read_reply(reader)).body == b"second"


async def pipeline_unread(writer: asyncio.StreamWriter, seconds: float) -> int:
    """Pipeline requests for `seconds`, reading none of the answers; the bytes sent."""
    batch = get() * 200
    sent = 0
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(seconds):
            while True:
                writer.write(batch)
                await writer.drain()  # returns only while the server reads on
                sent += len(batch)
    return sent


async def test_pipelined_answers_the_client_does_not_read_are_not_queued_without_bound() -> None:
    """Answers written whole (the gateway's own: 401, 404, ...) wait for the client to take
    the ones before: the server stops reading its requests meanwhile. It read on and queued
    every answer in memory, megabytes a second from one connection."""
    answer = b"x" * 4096

    async def own_answer(request: Request) -> None:
        request.connection.respond(request, 200, "OK", TEXT, answer)

    async with http_server(own_answer) as (server, port), connected(port) as (_, writer):
        await pipeline_unread(writer, 1.0)
        (connection,) = server.connections
        assert connection.transport is not None
        # The transport's high-water mark (64 KiB) and an answer or so above it, not MBs.
        assert connection.transport.get_write_buffer_size() < 256 * 1024
        writer.transport.abort()  # its unsent requests would hold the close


async def test_a_client_that_reads_none_of_its_pipelined_answers_is_cut_after_send_timeout() -> (
    None
):
    async def own_answer(request: Request) -> None:
        request.connection.respond(request, 200, "OK", TEXT, b"x" * 4096)

    served = http_server(own_answer, send_timeout=0.3)
    async with served as (server, port), connected(port) as (_, writer):
        await pipeline_unread(writer, 0.2)
        started = time.monotonic()
        while server.connections and time.monotonic() - started < 3:
            await asyncio.sleep(0.05)
        assert not server.connections
        writer.transport.abort()


async def test_a_slow_reader_of_pipelined_answers_gets_them_all() -> None:
    """Reading all along, however slowly, is not taking nothing: the cut is for a client that
    stopped reading, not for one whose answers take longer than `send_timeout` to leave."""

    async def own_answer(request: Request) -> None:
        request.connection.respond(request, 200, "OK", TEXT, b"x" * 4096)

    # Not shorter: the reader shares the server's event loop, and a stall of the whole test
    # process (a busy machine) longer than this would look like a client that stopped.
    served = http_server(own_answer, send_timeout=0.5)
    async with served as (_, port), connected(port) as (reader, writer):
        count = 3000  # 12 MB of answers, more than the socket buffers hold
        writer.write(get() * count)
        started = time.monotonic()
        for n in range(count):
            assert (await read_reply(reader)).status == 200
            if n % 100 == 0:
                await asyncio.sleep(0.03)
        assert time.monotonic() - started > 0.5  # longer than send_timeout, all the same


async def test_idle_connection_is_closed_after_keepalive_timeout() -> None:
    served = http_server(echo, keepalive_timeout=0.2)
    async with served as (_, port), connected(port) as (reader, writer):
        writer.write(get())
        await read_reply(reader)
        started = time.monotonic()
        assert await read_to_eof(reader) == b""
        # Swept every keepalive/4: closed soon after the timeout, not before it.
        assert 0.15 <= time.monotonic() - started < 1.0


async def test_connection_with_a_slow_handler_outlives_keepalive_timeout() -> None:
    async def slow(request: Request) -> None:
        await asyncio.sleep(0.4)  # twice the keep-alive timeout, while the client waits
        request.connection.respond(request, 200, "OK", TEXT, b"late")

    served = http_server(slow, keepalive_timeout=0.2)
    async with served as (_, port), connected(port) as (reader, writer):
        writer.write(get())
        assert (await read_reply(reader)).body == b"late"


async def test_connection_in_steady_use_outlives_keepalive_timeout() -> None:
    served = http_server(echo, keepalive_timeout=0.5)
    async with served as (_, port), connected(port) as (reader, writer):
        # A request every 0.1 s for 0.8 s: each answer restarts the idle clock. (A pause of
        # 0.4 s more than planned, a busy machine's late wake-up, still stays inside it.)
        for _ in range(9):
            writer.write(get())
            assert (await read_reply(reader)).status == 200
            await asyncio.sleep(0.1)
