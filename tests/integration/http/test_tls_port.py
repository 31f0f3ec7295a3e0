"""The proxy port's own server with TLS (gateway.http.tls_port), on each event loop it may run
on: each connection's first read decides between TLS and a 400 for plain HTTP, and the TLS is
started with the loop's own TLS protocol class, which neither loop offers as public API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gateway.http.request import Request
from gateway.http.server import HttpServer
from gateway.http.tls import server_context
from gateway.pipeline import answer_request_error
from tests.conftest import LeakCheckingLoop
from tests.support.certificates import make_certificate

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": LeakCheckingLoop,
    "asyncio": asyncio.SelectorEventLoop,
}


async def answer_scheme(request: Request) -> None:
    """200 whose body is the scheme the server says the request came with."""
    request.connection.respond(
        request, 200, "OK", b"Content-Type: text/plain\r\n", request.scheme.encode()
    )


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The status line and the body of one answer framed by Content-Length."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    return head.split(b"\r\n", 1)[0], body


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()


async def start_tls_listener(
    handler: Callable[[Request], Awaitable[None]], cert: Path, key: Path
) -> tuple[HttpServer, asyncio.Server, int]:
    """An HTTPS server of `handler` listening on a free loopback port: the server, its listener
    and the port. End it with `stop_tls_listener`."""
    server = HttpServer(
        handler,
        on_request_error=answer_request_error,
        head_timeout=5.0,
        keepalive_timeout=5.0,
        tls=server_context(str(cert), str(key)),
    )
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    return server, listener, listener.sockets[0].getsockname()[1]


async def stop_tls_listener(listener: asyncio.Server, server: HttpServer) -> None:
    """The end of `start_tls_listener`'s, whatever the test closed or drained already."""
    listener.close()
    await listener.wait_closed()
    await server.shutdown(0.5)


async def serve_both(cert: Path, key: Path, trust: ssl.SSLContext) -> None:
    server, listener, port = await start_tls_listener(answer_scheme, cert, key)
    try:
        # HTTPS: two requests on one kept-alive connection.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=trust, server_hostname="localhost"
        )
        try:
            for _ in range(2):
                writer.write(b"GET /a HTTP/1.1\r\nHost: localhost\r\n\r\n")
                assert await read_answer(reader) == (b"HTTP/1.1 200 OK", b"https")
            tls = writer.get_extra_info("ssl_object")
            assert tls.selected_alpn_protocol() == "http/1.1"
        finally:
            await close(writer)

        # Plain HTTP: a 400 in plain text, then the end of the connection.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /a HTTP/1.1\r\nHost: localhost\r\n\r\n")
            raw = await asyncio.wait_for(reader.read(), 5)
        finally:
            await close(writer)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert json.loads(body)["code"] == "plain_http_to_https_port"

        # A client that has sent nothing yet is closed by a shutdown at once, as an idle one is.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            async with asyncio.timeout(5):
                while not server.undecided:  # until the server has accepted it
                    await asyncio.sleep(0.01)
            listener.close()
            await server.shutdown(5.0)
            assert await asyncio.wait_for(reader.read(), 2) == b""
        finally:
            await close(writer)
    finally:
        await stop_tls_listener(listener, server)


@pytest.mark.parametrize("loop", LOOPS)
def test_https_and_plain_http_on_the_tls_port(tmp_path: Path, loop: str) -> None:
    made = make_certificate(tmp_path)
    trust = made.client_context()
    trust.set_alpn_protocols(["h2", "http/1.1"])
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(serve_both(made.cert, made.key, trust))


async def test_plain_http_still_sending_after_its_400_lingers_within_a_drain(
    tmp_path: Path,
) -> None:
    """A plain HTTP request whose body is still coming is refused with a lingering close: the
    400, the end of the server's side, then what the client sends read and dropped (a close
    with those bytes unread would reset it). A drain waits for it up to its grace."""
    made = make_certificate(tmp_path)
    server, listener, port = await start_tls_listener(answer_scheme, made.cert, made.key)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 9000000\r\n\r\n")
        writer.write(b"x" * 65536)
        status, _ = await read_answer(reader)
        assert status == b"HTTP/1.1 400 Bad Request"
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the server's side ended
        for _ in range(32):  # 2 MiB more, well past the socket buffers: read, not reset
            writer.write(b"x" * 65536)
            await writer.drain()
        assert len(server.refusals) == 1
        listener.close()
        started = time.monotonic()
        await server.shutdown(0.3)
        assert 0.25 <= time.monotonic() - started < 2.5  # waited for it, up to its grace
        async with asyncio.timeout(2):
            while server.refusals:  # closed at the deadline: lost a loop turn later
                await asyncio.sleep(0.01)
    finally:
        await close(writer)
        await stop_tls_listener(listener, server)


async def stream_before_the_body(request: Request) -> None:
    """An answer whose body has no length, begun before the request's body was read: to an
    HTTP/1.0 client it runs to the end of the connection."""
    connection = request.connection
    block = b"Content-Type: text/plain\r\n"
    connection.begin_answer(request, 200, "OK", block, chunked=True, close_delimited=True)
    await connection.write_body(b"streamed")
    connection.end_answer()


async def test_an_https_answer_delimited_by_the_close_is_not_held_by_a_lingering_close(
    tmp_path: Path,
) -> None:
    """On TLS a lingering close cannot send the end of the server's side before it waits (no
    close_notify without closing): an answer that ends only with the connection closes it at
    once, as before, rather than leaving its client waiting for the lingering's bounds."""
    made = make_certificate(tmp_path)
    server, listener, port = await start_tls_listener(stream_before_the_body, made.cert, made.key)
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=made.client_context(), server_hostname="localhost"
        )
        try:
            writer.write(b"POST /a HTTP/1.0\r\nContent-Length: 9000000\r\n\r\n" + b"x" * 65536)
            answer = await asyncio.wait_for(reader.read(), 3)  # the lingering waits 5 s
        finally:
            await close(writer)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert answer.endswith(b"\r\n\r\nstreamed")
    finally:
        await stop_tls_listener(listener, server)
