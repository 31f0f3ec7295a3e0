"""An answer given before the request's body was read ends the connection with a lingering
close (gateway/http/lingering.py): the client still sending gets its answer, not a reset.

A client that reads only once its body is sent (Python's http.client does) had its sends fail
with "Connection reset by peer" or "Broken pipe" when the gateway closed with its bytes
unread, and never read the answer. The clients here send their whole body first, then read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import pytest

from gateway.http.lingering import LingerBounds
from gateway.http.request import Request
from gateway.http.server import HttpServer
from gateway.problems import Unauthorized
from tests.support.config import worker_server_yaml, write_config
from tests.support.front import answer_problem, http_server
from tests.support.gateway import running_gateway

API = """
products:
  soccer:
    upstream: {url: "http://127.0.0.1:9/base"}
    routes: [{path: "/upload", methods: [POST]}]
plans: {open: {}}
keys: [{name: tester, key: secret-1, plans: {soccer: open}}]
"""

PIECE = b"x" * 65536


async def send_then_read(port: int, head: bytes, body_pieces: int, pause: float) -> bytes:
    """Send `head` and `body_pieces` pieces of 64 KiB (`pause` seconds apart), as a client
    that reads nothing before its request is sent; then everything up to the end of the
    connection. A send or a read that fails raises."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        for _ in range(body_pieces):
            writer.write(PIECE)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        return await asyncio.wait_for(reader.read(-1), 5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def answer_of(data: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    """The status, the headers (lower-case names) and the problem+json body of an answer."""
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {n.strip().lower(): v.strip() for n, _, v in (x.partition(":") for x in lines)}
    assert len(body) == int(headers["content-length"])  # the whole answer, then the end
    return int(status_line.split(" ")[1]), headers, json.loads(body)


# 4 MiB sent at once (far more than the socket buffers and the body queue hold), or 1 MiB
# trickled in pieces that arrive after the answer left.
SENDS = [pytest.param(64, 0.0, id="fast"), pytest.param(16, 0.005, id="trickled")]


@pytest.mark.parametrize(("pieces", "pause"), SENDS)
async def test_a_client_still_sending_a_refused_body_gets_the_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pieces: int, pause: float
) -> None:
    config = write_config(tmp_path / "config", API, server=worker_server_yaml())
    head = b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (pieces * 65536)
    runs = 6  # without the lingering close, every run's sends failed (RST) on loopback
    async with running_gateway(config) as worker:
        for _ in range(runs):
            data = await send_then_read(worker.proxy_port, head, pieces, pause)
            status, headers, problem = answer_of(data)
            assert (status, problem["code"]) == (401, "unauthorized")
            assert headers["content-type"] == "application/problem+json"
            assert headers["connection"] == "close"
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line[:1] == "{"]
    assert [line["status"] for line in lines] == [401] * runs  # each recorded once


async def test_a_client_sending_more_after_a_malformed_body_gets_its_400(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config", API, server=worker_server_yaml())
    head = (
        b"POST /upload HTTP/1.1\r\nHost: t\r\nX-API-Key: secret-1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"  # not a chunk size
    )
    async with running_gateway(config) as worker:
        for _ in range(3):
            status, _, problem = answer_of(await send_then_read(worker.proxy_port, head, 32, 0))
            assert (status, problem["code"]) == (400, "bad_request")


async def refuse(request: Request) -> None:
    answer_problem(request, Unauthorized("no key"), "rid")


async def until_no_connections(server: HttpServer, within: float) -> float:
    """Seconds until `server` holds no connection; fails the test after `within`."""
    started = time.monotonic()
    async with asyncio.timeout(within):
        while server.connections:
            await asyncio.sleep(0.01)
    return time.monotonic() - started


async def answered_and_silent(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client that sent the head of a 10 MB upload and 1 MiB of it, read its answer to the
    end (the FIN after it), and sends nothing more."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /u HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n\r\n")
    for _ in range(16):
        writer.write(PIECE)
        await writer.drain()
    status, _, _ = answer_of(await asyncio.wait_for(reader.read(-1), 5))
    assert status == 401
    return reader, writer


async def test_a_lingering_connection_whose_client_stops_sending_is_closed_after_idle() -> None:
    bounds = LingerBounds(idle=0.3, total=10.0, size=64 * 1024 * 1024)
    async with http_server(refuse, linger=bounds) as (server, port):
        _, writer = await answered_and_silent(port)
        try:
            silent_since = time.monotonic()
            await until_no_connections(server, 5)
            assert time.monotonic() - silent_since >= 0.2  # not at once: it lingered
        finally:
            writer.close()


async def test_a_lingering_connection_is_closed_after_its_time_however_it_sends() -> None:
    bounds = LingerBounds(idle=5.0, total=0.4, size=64 * 1024 * 1024)
    async with http_server(refuse, linger=bounds) as (server, port):
        _, writer = await answered_and_silent(port)
        keep_sending = asyncio.create_task(trickle(writer))
        try:
            elapsed = await until_no_connections(server, 5)
            assert elapsed < 4  # the 5 s without a byte never came
        finally:
            keep_sending.cancel()
            writer.close()


async def trickle(writer: asyncio.StreamWriter) -> None:
    """A byte every 20 ms, until the connection fails."""
    with contextlib.suppress(ConnectionError):
        while True:
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.02)


async def test_a_lingering_connection_is_closed_once_its_client_sent_too_much() -> None:
    bounds = LingerBounds(idle=5.0, total=10.0, size=256 * 1024)
    async with http_server(refuse, linger=bounds) as (server, port):
        _, writer = await answered_and_silent(port)
        sent = 0
        with contextlib.suppress(ConnectionError):
            for _ in range(256):  # 16 MiB, far beyond the bound and the socket buffers
                writer.write(PIECE)
                await writer.drain()
                sent += len(PIECE)
        writer.close()
        assert sent < 16 * 1024 * 1024
        await until_no_connections(server, 2)


async def test_a_drain_does_not_wait_for_lingering_connections_past_its_grace() -> None:
    bounds = LingerBounds(idle=5.0, total=10.0, size=64 * 1024 * 1024)
    async with http_server(refuse, linger=bounds) as (server, port):
        _, writer = await answered_and_silent(port)
        keep_sending = asyncio.create_task(trickle(writer))
        try:
            started = time.monotonic()
            await server.shutdown(0.3)
            assert time.monotonic() - started < 2.5
            await until_no_connections(server, 1)  # cut at the deadline: lost a turn later
        finally:
            keep_sending.cancel()
            writer.close()
