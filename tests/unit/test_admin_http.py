"""The admin port's server as aiohttp makes it, remade so that aiohttp's own refusals are
problems and its connections read one request at a time (real servers on loopback, raw
clients); and, should an aiohttp upgrade change the private parts that remaking reads, left as
aiohttp made it rather than failing the gateway's start."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.admin_http import _AdminConnection, _AdminServer, _OneRequestAtATime, admin_server
from tests.support.raw_http import connected


async def _handler(request: web.BaseRequest) -> web.StreamResponse:
    return web.Response()


async def test_aiohttps_server_is_remade_as_the_admin_ports() -> None:
    made = web.Server(_handler, handler_cancellation=True)
    remade = admin_server(made)
    assert isinstance(remade, _AdminServer)
    assert remade.request_handler is _handler and remade.handler_cancellation
    assert remade.connection_kind is _OneRequestAtATime


async def test_a_server_of_another_shape_is_kept_and_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    made = web.Server(_handler)
    del made._kwargs  # what a later aiohttp might no longer have
    with caplog.at_level(logging.WARNING, logger="gateway.admin"):
        assert admin_server(made) is made
    assert "is not as expected" in caplog.text


async def test_connections_of_another_shape_read_requests_as_aiohttps_do(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later aiohttp's connections might make their parser only once connected: none to
    bound, they are made as aiohttp reads requests, and said; their refusals still problems."""
    makes = RequestHandler.__init__

    def without_a_parser(connection: RequestHandler, *args: Any, **settings: Any) -> None:
        makes(connection, *args, **settings)
        connection._parser = None

    monkeypatch.setattr(RequestHandler, "__init__", without_a_parser)
    with caplog.at_level(logging.WARNING, logger="gateway.admin"):
        remade = admin_server(web.Server(_handler))
    assert isinstance(remade, _AdminServer) and remade.connection_kind is _AdminConnection
    assert "connections are not as expected (the connection has no parser)" in caplog.text
    assert type(remade()) is _AdminConnection


@asynccontextmanager
async def _connected_to(
    server: web.Server,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A raw client connection to `server`, served on a loopback port of the OS's choosing."""
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    try:
        async with connected(listener.sockets[0].getsockname()[1]) as connection:
            yield connection
    finally:
        listener.close()
        await server.shutdown(1)
        await listener.wait_closed()


async def _numbered(request: web.BaseRequest) -> web.StreamResponse:
    return web.Response(text=request.path)


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


@pytest.mark.parametrize("count", [1, 40], ids=["one", "more-than-aiohttp-reads-ahead"])
async def test_requests_pipelined_before_a_refused_one_are_answered_first(count: int) -> None:
    """In one write: `count` requests and one the parser refuses. aiohttp's parser dropped those
    it had read in the same go as the refused one: all of them, or, past the 32 it reads ahead
    at most, some."""
    async with _connected_to(admin_server(web.Server(_numbered))) as (reader, writer):
        writer.write(b"".join(_get(f"/{n}") for n in range(count)) + b"FOO / HTTP/1.1\r\n\r\n")
        received = await asyncio.wait_for(reader.read(), 10)  # to the connection's end
    answers = re.split(rb"HTTP/1\.[01] ", received)[1:]  # aiohttp's refusals say HTTP/1.0
    assert [a.rpartition(b"\r\n\r\n")[2] for a in answers[:-1]] == [
        f"/{n}".encode() for n in range(count)
    ]
    assert answers[-1].startswith(b"400 ") and b'"code": "bad_request"' in answers[-1]


async def test_many_pipelined_requests_are_all_answered() -> None:
    """Read one at a time, the socket paused while one waits: none is left unread."""
    async with _connected_to(admin_server(web.Server(_numbered))) as (reader, writer):
        writer.write(b"".join(_get(f"/{n}") for n in range(500)))
        for n in range(500):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            body = await asyncio.wait_for(reader.readexactly(length), 10)
            assert body == f"/{n}".encode()


async def test_a_request_after_a_body_taken_late_is_answered() -> None:
    """Read one request at a time, the parser stops at the end of each, and of a body that came
    after its request was taken too: with nothing queued whose taking would have it read on, a
    request sent in the same packet as that body would wait for bytes that never come."""
    taken = asyncio.Event()

    async def answer_once_the_body_has_come(request: web.BaseRequest) -> web.StreamResponse:
        taken.set()
        await request.content.wait_eof()  # come, and never read
        return web.Response(text=request.path)

    async with _connected_to(admin_server(web.Server(answer_once_the_body_has_come))) as (
        reader,
        writer,
    ):
        writer.write(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        await asyncio.wait_for(taken.wait(), 10)
        writer.write(b"hello" + _get("/b"))
        for path in (b"/a", b"/b"):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            assert await asyncio.wait_for(reader.readexactly(length), 10) == path
