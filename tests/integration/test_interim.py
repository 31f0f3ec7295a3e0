"""Interim answers: a raw-socket upstream sends 1xx heads before its final answer, and the
gateway passes them on (but 100 Continue, which is the gateway's own business) to HTTP/1.1
clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

from tests.support.config import worker_server_yaml, write_config
from tests.support.gateway import running_gateway

API = """
products:
  shop:
    upstream: {{url: "http://127.0.0.1:{port}"}}
    routes:
      - path: /shop/{{rest:path}}
plans:
  open: {{}}
keys:
  - {{name: client, key: hints-secret, plans: {{shop: open}}}}
"""

INTERIM = (
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 103 Early Hints\r\n"
    b"Link: </style.css>; rel=preload; as=style\r\n"
    b"Link: </app.js>; rel=preload; as=script\r\n"
    b"Connection: X-Hop\r\n"
    b"X-Hop: dropped\r\n"
    # The gateway's to say, in the final answer: never the upstream's, not even in a hint.
    b"X-RateLimit-Remaining: 4999\r\n"
    b"x-request-id: the-upstream's\r\n"
    b"\r\n"
)
FINAL = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nLink: </style.css>; rel=preload\r\n\r\nhello"


Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serving(serve: Serve) -> AsyncIterator[int]:
    """A raw upstream on loopback that runs `serve` on each connection; yields its port."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await serve(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def _hints_then_final(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request head with INTERIM, a pause, and FINAL, on the same connection."""
    while await reader.readuntil(b"\r\n\r\n"):
        writer.write(INTERIM)
        await writer.drain()
        await asyncio.sleep(0.05)  # the hints travel alone, ahead of the answer
        writer.write(FINAL)
        await writer.drain()


def raw_upstream() -> AbstractAsyncContextManager[int]:
    return serving(_hints_then_final)


async def answers_through_a_gateway(tmp_path: Path, serve: Serve, count: int = 1) -> list[bytes]:
    """`count` HTTP/1.1 exchanges, each on a connection of its own, through a gateway in front
    of an upstream that runs `serve`."""
    async with serving(serve) as port:
        config = write_config(tmp_path, API.format(port=port), server=worker_server_yaml())
        async with running_gateway(config) as gateway:
            return [await exchange(gateway.proxy_port, "1.1") for _ in range(count)]


async def exchange(port: int, version: str) -> bytes:
    """One request over a raw connection; everything until the final answer's body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET /shop/page HTTP/{version}\r\nHost: shop\r\nX-API-Key: hints-secret\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


async def test_early_hints_reach_an_http11_client_before_the_answer(tmp_path: Path) -> None:
    async with raw_upstream() as port:
        config = write_config(tmp_path, API.format(port=port), server=worker_server_yaml())
        async with running_gateway(config) as gateway:
            received = await exchange(gateway.proxy_port, "1.1")
    hints, _, final = received.partition(b"\r\n\r\n")
    assert hints == (
        b"HTTP/1.1 103 Early Hints\r\n"
        b"Link: </style.css>; rel=preload; as=style\r\n"
        b"Link: </app.js>; rel=preload; as=script"
    )
    assert final.startswith(b"HTTP/1.1 200 OK\r\n")
    assert final.endswith(b"\r\n\r\nhello")
    assert b"100 Continue" not in received


async def test_an_http10_client_gets_the_final_answer_only(tmp_path: Path) -> None:
    async with raw_upstream() as port:
        config = write_config(tmp_path, API.format(port=port), server=worker_server_yaml())
        async with running_gateway(config) as gateway:
            received = await exchange(gateway.proxy_port, "1.0")
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b" 103 " not in received


async def test_keep_alive_connection_serves_the_next_answer_after_hints(tmp_path: Path) -> None:
    async with raw_upstream() as port:
        config = write_config(tmp_path, API.format(port=port), server=worker_server_yaml())
        async with running_gateway(config) as gateway:
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
            request = b"GET /shop/page HTTP/1.1\r\nHost: shop\r\nX-API-Key: hints-secret\r\n\r\n"
            try:
                for _ in range(2):
                    writer.write(request)
                    async with asyncio.timeout(10):
                        hints = await reader.readuntil(b"\r\n\r\n")
                        head = await reader.readuntil(b"\r\n\r\n")
                        body = await reader.readexactly(5)
                    assert hints.startswith(b"HTTP/1.1 103 Early Hints\r\n")
                    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b"hello"
            finally:
                writer.close()


async def test_an_interim_answer_after_the_final_one_is_never_passed_on(tmp_path: Path) -> None:
    """A 103 that follows a complete answer in the same read was no interim answer of that
    exchange: it went to the client ahead of the 200, and the upstream connection, spoilt,
    was used again."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(FINAL + b"HTTP/1.1 103 Early Hints\r\nLink: </late.css>\r\n\r\n")
            await writer.drain()

    answers = await answers_through_a_gateway(tmp_path, serve, 2)
    for received in answers:
        assert received.startswith(b"HTTP/1.1 200 OK\r\n") and received.endswith(b"hello")
        assert b"late.css" not in received
    assert connections == 2


async def test_a_final_head_after_a_large_interim_one_is_measured_alone(tmp_path: Path) -> None:
    """A read that ended a 40 KB 103 and began the 60 KB final head was counted whole against
    the final head, which then passed for one over 64 KiB: a 502 for a valid answer."""
    fill = b"".join(b"X-Fill-%04d: %s\r\n" % (i, b"f" * 86) for i in range(400))  # 40 KB
    interim = b"HTTP/1.1 103 Early Hints\r\n" + fill + b"\r\n"
    final = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n" + fill + fill[: len(fill) // 2] + b"\r\n"
    whole = interim + final + b"hello"
    # The second read ends the 103 and holds half the final head, the third does not end it.
    cuts = (30_000, len(interim) + 30_000, len(interim) + 56_000)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for begin, end in zip((0, *cuts), (*cuts, len(whole)), strict=True):
            writer.write(whole[begin:end])  # each a read of its own, most likely
            await writer.drain()
            await asyncio.sleep(0.05)
        await reader.read()

    (received,) = await answers_through_a_gateway(tmp_path, serve)
    assert b"\r\n\r\nHTTP/1.1 200 OK\r\n" in received, received[-300:]
    assert received.endswith(b"\r\n\r\nhello")
