"""The upstream HTTP client (gateway.http.client) when the upstream fails it: connections it
closed while idle, refused or slow connections, heads and bodies that stall, break off or are
garbage. Upstreams are raw asyncio servers writing exactly the bytes under test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.http.errors import (
    ConnectError,
    ConnectTimeout,
    MalformedResponse,
    ResponseBodyError,
    ResponseTimeout,
    ServerDisconnected,
)
from gateway.http.reply_reader import MAX_INTERIM
from tests.support.raw_upstream import Peer, keep_answering, raw_upstream
from tests.support.sockets import closed_port, unaccepting_port
from tests.support.upstream_client import HOST, client_for, fetch

# ---------------------------------------------------------------- stale connections


async def test_connection_closed_while_idle_is_not_used() -> None:
    async def answer_once_then_close(peer: Peer) -> None:
        await peer.head()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async with raw_upstream(answer_once_then_close) as up, client_for(up.port) as client:
        assert await fetch(client) == (200, b"ok")
        await asyncio.wait_for(up.closed.wait(), 2)
        await asyncio.sleep(0.05)  # the client's loop sees the EOF
        assert await fetch(client) == (200, b"ok")
    assert up.connections == 2


async def _close_on_second_request(peer: Peer) -> None:
    """Answers one request, then reads the next and closes without a byte of answer: the
    race of an upstream's keep-alive timeout with a request already on its way."""
    await peer.head()
    await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await peer.head()


async def test_idempotent_request_is_retried_once_on_a_fresh_connection() -> None:
    async with raw_upstream(_close_on_second_request) as up, client_for(up.port) as client:
        assert await fetch(client) == (200, b"ok")
        # The stale connection swallows the request; a fresh one answers it.
        assert await fetch(client) == (200, b"ok")
    assert up.connections == 2


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_non_idempotent_request_is_not_retried(method: str) -> None:
    async with raw_upstream(_close_on_second_request) as up, client_for(up.port) as client:
        assert await fetch(client) == (200, b"ok")
        with pytest.raises(ServerDisconnected, match="closed without an answer"):
            await client.send(method, "/x", HOST, None)
    assert up.connections == 1


async def test_retry_happens_once_only() -> None:
    connections: list[Peer] = []

    async def script(peer: Peer) -> None:
        connections.append(peer)
        if len(connections) == 1:
            await _close_on_second_request(peer)
        else:
            await peer.head()  # and close without an answer, again

    async with raw_upstream(script) as up, client_for(up.port) as client:
        assert await fetch(client) == (200, b"ok")
        with pytest.raises(ServerDisconnected, match="closed without an answer"):
            await client.send("GET", "/x", HOST, None)
    assert up.connections == 2


# -------------------------------------------------------------------------- failures


async def test_interim_answers_passed_on_are_bounded() -> None:
    async def script(peer: Peer) -> None:
        await peer.head()
        for _ in range(MAX_INTERIM * 5):
            await peer.send(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await peer.reader.read()

    told: list[int] = []
    async with raw_upstream(script) as up, client_for(up.port) as client:
        reply = await client.send(
            "GET", "/x", HOST, None, on_interim=lambda status, reason, lines: told.append(status)
        )
        assert reply.status == 200
        reply.finish()
        # A second exchange on the connection is told of its own again.
    assert told == [103] * MAX_INTERIM


async def test_garbage_is_bad_gateway() -> None:
    async def script(peer: Peer) -> None:
        await peer.head()
        await peer.send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await peer.reader.read()

    async with raw_upstream(script) as up, client_for(up.port) as client:
        with pytest.raises(MalformedResponse, match="invalid HTTP response"):
            await client.send("GET", "/x", HOST, None)


async def test_slow_head_is_gateway_timeout_and_the_connection_is_closed() -> None:
    async def script(peer: Peer) -> None:
        await peer.head()
        await peer.reader.read()  # returns once the client gives up

    async with raw_upstream(script) as up, client_for(up.port, timeout=0.2) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ResponseTimeout, match=r"did not answer within 0\.2s"):
            await client.send("GET", "/x", HOST, None)
        assert loop.time() - started < 1.5
        await asyncio.wait_for(up.closed.wait(), 2)


async def test_an_upload_the_upstream_stops_taking_is_gateway_timeout() -> None:
    """The client bounds an upload by itself: the upstream may take nothing of the body for
    longer than its timeout (and time spent waiting for the body's source is not counted)."""

    async def script(peer: Peer) -> None:
        await peer.head()
        await peer.reader.readexactly(65536)  # a little, then no more
        await asyncio.sleep(10)

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * 65536
            await asyncio.sleep(0)

    async with (
        raw_upstream(script, receive_buffer=4096, max_segment=536) as up,
        client_for(up.port, timeout=0.3) as client,
    ):
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ResponseTimeout, match=r"did not accept the request body within 0\.3s"):
            await asyncio.wait_for(client.send("POST", "/up", HOST, endless()), 5)
        assert loop.time() - started < 3


async def test_refused_connection_is_bad_gateway() -> None:
    async with client_for(closed_port()) as client:
        with pytest.raises(ConnectError, match="refused"):
            await client.send("GET", "/x", HOST, None)


async def test_no_connection_in_time_is_gateway_timeout() -> None:
    with unaccepting_port() as port:
        async with client_for(port, connect_timeout=0.2) as client:
            with pytest.raises(ConnectTimeout, match="no connection"):
                await client.send("GET", "/x", HOST, None)


async def test_truncated_body_is_a_body_error() -> None:
    async def script(peer: Peer) -> None:
        await peer.head()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"a" * 10)

    async with raw_upstream(script) as up, client_for(up.port) as client:
        reply = await client.send("GET", "/x", HOST, None)
        assert await reply.read() == b"a" * 10
        with pytest.raises(ResponseBodyError, match="incomplete"):
            await reply.read()
        reply.abort()


async def test_body_stall_is_a_body_error() -> None:
    async def script(peer: Peer) -> None:
        await peer.head()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"a" * 10)
        await peer.reader.read()

    async with raw_upstream(script) as up, client_for(up.port, timeout=0.2) as client:
        reply = await client.send("GET", "/x", HOST, None)
        assert await reply.read() == b"a" * 10
        with pytest.raises(ResponseBodyError, match="stalled"):
            await reply.read()
        reply.abort()
        await asyncio.wait_for(up.closed.wait(), 2)


async def test_cancellation_closes_the_connection_at_once() -> None:
    async def script(peer: Peer) -> None:
        await peer.head()
        await peer.reader.read()

    async with raw_upstream(script) as up, client_for(up.port) as client:
        sending = asyncio.create_task(client.send("GET", "/x", HOST, None))
        await asyncio.sleep(0.1)
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        await asyncio.wait_for(up.closed.wait(), 1)


async def test_idle_connections_are_closed_after_the_keepalive_time() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with (
        raw_upstream(keep_answering(answer)) as up,
        client_for(up.port, keepalive=0.5) as client,
    ):
        assert await fetch(client) == (200, b"ok")
        await asyncio.sleep(0.1)  # however late this wakes on a busy machine, not 0.4 s late
        assert not up.closed.is_set()
        await asyncio.wait_for(up.closed.wait(), 2)
