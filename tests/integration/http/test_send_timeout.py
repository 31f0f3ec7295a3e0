"""The send watch of the proxy port's server (`AnswerWriter.write_body` with a `send_timeout`),
over real loopback sockets: a client that takes nothing of its answer for that long is told
apart from one that reads. The proxy's streamed answers (tests/integration/proxy) and the
pipelined answers the server writes whole (test_server_keep_alive.py) rely on it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.http.errors import SendTimeout
from gateway.http.request import Request
from gateway.http.server_connection import ServerConnection
from tests.support.front import http_server

TEXT = b"Content-Type: text/plain\r\n"
PIECE = b"x" * (256 * 1024)
# Longer than any answer here: the body is cut, never complete.
ENDLESS = b"Content-Length: %d\r\n" % (1 << 40)
MB = 1024 * 1024


@asynccontextmanager
async def small_window_client(port: int) -> AsyncIterator[socket.socket]:
    """A raw client whose receive buffer is small, so that the server's writes must wait for
    it soon: what it does not read stays on the server's side."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        yield sock
    finally:
        sock.close()


async def write_until_cut(connection: ServerConnection, waited: asyncio.Future[float]) -> None:
    """Stream pieces allowed 0.3 s each until the send watch cuts the client: `waited` says
    how long the last wait took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        while True:
            await connection.write_body(PIECE, 0.3)
    except SendTimeout:
        waited.set_result(loop.time() - started)
        connection.abort()


async def test_a_client_that_takes_nothing_of_a_streamed_answer_gets_send_timeout() -> None:
    loop = asyncio.get_running_loop()
    waited: asyncio.Future[float] = loop.create_future()

    async def endless(request: Request) -> None:
        connection = request.connection
        connection.begin_answer(request, 200, "OK", TEXT + ENDLESS)
        await write_until_cut(connection, waited)

    async with http_server(endless) as (_, port), small_window_client(port):
        # Not before its allowance; the upper bound is loose for a busy machine.
        assert 0.3 <= await asyncio.wait_for(waited, 10) < 5


async def test_a_long_allowance_set_before_does_not_hold_back_a_shorter_one() -> None:
    """The watch keeps one timer per connection: one still set for a wait with a long allowance
    (30 s, taken in the end) must not put off the cut of a later wait allowed 0.3 s."""
    loop = asyncio.get_running_loop()
    first = 8 * MB  # more than loopback's socket buffers hold: some write of it waits
    waited: asyncio.Future[float] = loop.create_future()

    async def two_allowances(request: Request) -> None:
        connection = request.connection
        connection.begin_answer(request, 200, "OK", TEXT + ENDLESS)
        for _ in range(first // len(PIECE)):
            await connection.write_body(PIECE, 30.0)
        await write_until_cut(connection, waited)

    async with http_server(two_allowances) as (_, port), small_window_client(port) as sock:
        await asyncio.sleep(0.2)  # reads nothing at first: a write waits, the timer is set
        head = b""
        while b"\r\n\r\n" not in head:
            head += await loop.sock_recv(sock, 1024)
        body = len(head.partition(b"\r\n\r\n")[2])
        while body < first:  # then takes the first part only, and stops reading
            body += len(await loop.sock_recv(sock, min(64 * 1024, first - body)))
        assert 0.3 <= await asyncio.wait_for(waited, 10) < 5
