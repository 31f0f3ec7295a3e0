"""The proxy port's own HTTP/1.1 server (gateway.http.server) shutting down: an idle
connection is closed at once, requests in flight and pipelined ones already read are answered
within the grace, and the rest are cut.

Each test runs an `HttpServer` with a small handler of its own and sub-second timeouts, and
speaks raw HTTP to it (tests.support.raw_http): what is checked is the server's protocol
behaviour, not the gateway's request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from gateway.http.request import Request
from tests.support.front import http_server
from tests.support.raw_http import (
    TEXT,
    Parked,
    connected,
    echo,
    get,
    read_reply,
    read_to_eof,
)


async def test_shutdown_closes_an_idle_connection_at_once() -> None:
    async with http_server(echo) as (server, port), connected(port) as (reader, writer):
        writer.write(get())
        await read_reply(reader)
        started = time.monotonic()
        await server.shutdown(2.0)
        assert time.monotonic() - started < 1.5  # nothing to wait for: not the grace period
        assert await read_to_eof(reader) == b""


async def test_shutdown_lets_a_request_in_flight_finish_with_connection_close() -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def waits(request: Request) -> None:
        started.set()
        await release.wait()
        request.connection.respond(request, 200, "OK", TEXT, b"finished")

    async with http_server(waits) as (server, port), connected(port) as (reader, writer):
        writer.write(get())
        await asyncio.wait_for(started.wait(), 2)
        shutdown = asyncio.create_task(server.shutdown(2.0))
        await asyncio.sleep(0.05)
        assert not shutdown.done()  # it waits for the answer
        release.set()
        reply = await read_reply(reader)
        assert (reply.status, reply.body) == (200, b"finished")
        assert reply.headers["connection"] == "close"
        assert await read_to_eof(reader) == b""
        await asyncio.wait_for(shutdown, 1)  # done once the last connection went


async def test_shutdown_answers_the_pipelined_requests_already_read() -> None:
    """Read before the shutdown began, they are in flight as much as the first: each is
    answered, the last one says close (they were dropped unanswered)."""
    started, release = asyncio.Event(), asyncio.Event()

    async def first_waits(request: Request) -> None:
        if request.raw_path == "/1":
            started.set()
            await release.wait()
        request.connection.respond(request, 200, "OK", TEXT, request.raw_path.encode())

    async with http_server(first_waits) as (server, port), connected(port) as (reader, writer):
        writer.write(get("/1") + get("/2") + get("/3"))
        await asyncio.wait_for(started.wait(), 2)
        await asyncio.sleep(0.05)  # for the other two heads to be read
        shutdown = asyncio.create_task(server.shutdown(2.0))
        await asyncio.sleep(0.05)
        release.set()
        replies = [await read_reply(reader) for _ in range(3)]
        assert [reply.body for reply in replies] == [b"/1", b"/2", b"/3"]
        assert [reply.headers.get("connection") for reply in replies] == [None, None, "close"]
        assert await read_to_eof(reader) == b""
        await asyncio.wait_for(shutdown, 1)


async def test_shutdown_cuts_a_request_that_outlasts_the_grace() -> None:
    parked = Parked()
    async with http_server(parked) as (server, port), connected(port) as (reader, writer):
        writer.write(get())
        await asyncio.wait_for(parked.started.wait(), 2)
        began = time.monotonic()
        await server.shutdown(0.15)
        assert 0.1 <= time.monotonic() - began < 1.0
        await asyncio.wait_for(parked.cancelled.wait(), 1)
        # No answer at all: the client sees the cut rather than a complete-looking answer.
        with contextlib.suppress(ConnectionResetError):  # an abort may arrive as a reset
            assert await read_to_eof(reader) == b""


async def test_shutdown_returns_only_after_cut_handlers_have_finished() -> None:
    parked = Parked()
    async with http_server(parked) as (server, port), connected(port) as (_, writer):
        writer.write(get())
        await asyncio.wait_for(parked.started.wait(), 2)
        await server.shutdown(0.05)
        # What shutdown() promises ("the cancelled handlers record their 499s before the
        # process goes"): the worker closes the upstream pools right after it returns.
        assert parked.cancelled.is_set()
