"""The proxy port's own HTTP/1.1 server (gateway.http.server) writing answers: HEAD,
chunked and close-delimited answers, an upgrade request's ordinary answer, and a client that
goes away cancelling its handler.

Each test runs an `HttpServer` with a small handler of its own and sub-second timeouts, and
speaks raw HTTP to it (tests.support.raw_http): what is checked is the server's protocol
behaviour, not the gateway's request path.
"""

from __future__ import annotations

import asyncio

from gateway.http.request import Request
from tests.support.front import http_server
from tests.support.raw_http import (
    TEXT,
    Parked,
    Recording,
    connected,
    echo,
    get,
    read_reply,
    read_to_eof,
)


async def test_head_request_gets_content_length_but_no_body() -> None:
    async with http_server(echo) as (_, port), connected(port) as (reader, writer):
        writer.write(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n" + get("/next"))
        reply = await read_reply(reader, head_only=True)
        assert reply.headers["content-length"] == str(len(b"HEAD /h "))
        # Were any body bytes sent, they would stand where the next status line must be.
        following = await read_reply(reader)
        assert (following.status, following.body) == (200, b"GET /next ")


async def test_client_going_away_cancels_the_handler() -> None:
    parked = Parked()
    async with http_server(parked) as (_, port):
        async with connected(port) as (_, writer):
            writer.write(get())
            await asyncio.wait_for(parked.started.wait(), 2)
        # Closed with the handler still waiting: the task must not run on for nobody.
        await asyncio.wait_for(parked.cancelled.wait(), 1)


async def streamed(request: Request) -> None:
    """An answer whose length is unknown when it begins, as a streamed upstream body's is."""
    connection = request.connection
    connection.begin_answer(request, 200, "OK", TEXT, chunked=True)
    for part in (b"one,", b"two,"):
        await connection.write_body(part)
        await asyncio.sleep(0.01)  # separate writes, as a body trickling from upstream
    connection.end_answer(b"three")


async def test_chunked_answer_to_http11_client_is_validly_chunked() -> None:
    async with http_server(streamed) as (_, port), connected(port) as (reader, writer):
        writer.write(get())
        reply = await read_reply(reader)
        assert reply.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in reply.headers
        assert reply.raw_body == b"4\r\none,\r\n4\r\ntwo,\r\n5\r\nthree\r\n0\r\n\r\n"
        writer.write(get())  # chunked framing keeps the connection usable
        assert (await read_reply(reader)).body == b"one,two,three"


async def test_chunked_answer_to_http10_client_is_close_delimited() -> None:
    async with http_server(streamed) as (_, port), connected(port) as (reader, writer):
        # An HTTP/1.0 client cannot read chunks, even when it asks to keep the connection.
        writer.write(get(version="1.0", extra="Connection: keep-alive\r\n"))
        reply = await read_reply(reader)  # no length, no chunks: read to the close
        assert "transfer-encoding" not in reply.headers
        assert reply.headers["connection"] == "close"
        assert reply.body == b"one,two,three"


async def test_upgrade_request_gets_an_ordinary_answer_then_close() -> None:
    recording = Recording()
    async with http_server(recording) as (_, port), connected(port) as (reader, writer):
        upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        # Bytes of the other protocol after the head must not be parsed as HTTP.
        writer.write(get("/ws", extra=upgrade) + b"\x81\x05hello" + get("/smuggled"))
        reply = await read_reply(reader)
        assert (reply.status, reply.body) == (200, b"GET /ws ")
        assert reply.headers["connection"] == "close"
        assert await read_to_eof(reader) == b""
        assert recording.paths == ["/ws"]
