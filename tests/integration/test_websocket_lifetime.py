"""How a WebSocket through a real gateway ends, and what does not end it: activity either way,
either side closing, a reload, and the drain of a `gateway run` process on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from tests.integration.test_websocket import (
    API,
    SWITCHED,
    gateway_and_upstream,
    handshake_before,
    ws_url,
)
from tests.support.processes import GatewayProcess
from tests.support.raw_upstream import Peer
from tests.support.sockets import free_ports
from tests.support.upstream import running_upstream


async def test_pings_alone_keep_a_websocket_past_its_idle_time(tmp_path: Path) -> None:
    """A ping and its pong are bytes both ways: a client that pings more often than
    `websocket_idle` keeps its WebSocket however long nothing else moves."""
    async with gateway_and_upstream(tmp_path, websocket_idle="400ms") as (gateway, _, session):
        url = ws_url(gateway, "/ws/echo?api_key=ws-secret")
        ws = await session.ws_connect(url, autoping=False)
        started = time.monotonic()
        while time.monotonic() - started < 1.5:  # well over three idle periods
            await ws.ping(b"still here")
            pong = await asyncio.wait_for(ws.receive(), 5)
            assert pong.type == aiohttp.WSMsgType.PONG, pong
            await asyncio.sleep(0.1)
        await _echoes(ws, "after the pings")
        await ws.close()


async def test_bytes_one_way_keep_a_websocket_past_its_idle_time(tmp_path: Path) -> None:
    """Only the client sends, the upstream never answers: still activity."""

    async def listen_only(peer: Peer) -> None:
        await peer.head()
        await peer.send(SWITCHED)
        while await peer.reader.read(65536):
            pass

    async with handshake_before(tmp_path, listen_only, websocket_idle="400ms") as (
        _,
        reader,
        writer,
    ):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 "), head
        started = time.monotonic()
        while time.monotonic() - started < 1.5:
            writer.write(b"\x81\x80\x00\x00\x00\x00")  # an empty masked text frame
            quiet_from = time.monotonic()
            await asyncio.sleep(0.1)
            assert not reader.at_eof(), "closed though bytes kept moving up"
        # Then quiet: closed an idle period after the last byte (its arrival, on the gateway's
        # clock; 50 ms for that clock's lag). Measured from the end of the last sleep instead,
        # a sleep that overran on a busy host made the gateway's close look early (0.296 s).
        rest = await asyncio.wait_for(reader.read(), 10)
        assert rest == b""
        assert time.monotonic() - quiet_from >= 0.35


@pytest.mark.parametrize("how", ["close-frame", "fin", "reset"])
async def test_the_upstream_ending_ends_the_client_side_at_once(tmp_path: Path, how: str) -> None:
    async def end(peer: Peer) -> None:
        await peer.head()
        await peer.send(SWITCHED)
        await peer.reader.readexactly(6)  # the client's first frame: it is there
        if how == "close-frame":
            await peer.send(b"\x88\x02\x03\xe8")  # close, 1000
            await peer.reader.read()
        elif how == "fin":
            peer.writer.close()
        else:
            peer.writer.transport.abort()

    async with handshake_before(tmp_path, end, websocket_idle="30s") as (_, reader, writer):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 "), head
        writer.write(b"\x81\x80\x00\x00\x00\x00")
        started = time.monotonic()
        if how == "close-frame":
            assert await asyncio.wait_for(reader.readexactly(4), 10) == b"\x88\x02\x03\xe8"
            writer.close()  # the client answers the close by closing: both ends go
        else:
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed after it
        assert time.monotonic() - started < 3  # far below the 30 s idle time


async def _echoes(ws: aiohttp.ClientWebSocketResponse, text: str) -> None:
    await ws.send_str(text)
    assert await asyncio.wait_for(ws.receive_str(), 5) == text


async def test_websockets_outlive_a_reload_and_end_with_the_drain_of_sigterm(
    tmp_path: Path,
) -> None:
    """A `gateway run` process: a reload leaves open WebSockets alone; on SIGTERM they keep
    relaying for the drain period, are closed at its end and logged (status 101, bytes both
    ways, one line each), and the process exits 0 right after."""
    proxy_port, admin_port = free_ports(2)
    config = tmp_path / "conf"
    config.mkdir()
    (config / "00-server.yaml").write_text(
        f"server:\n  listen: 127.0.0.1:{proxy_port}\n  admin_listen: 127.0.0.1:{admin_port}\n"
        "  drain_timeout: 1s\n  timeouts: {websocket_idle: 30s}\n"
    )
    async with running_upstream() as upstream, aiohttp.ClientSession() as session:
        (config / "10-api.yaml").write_text(API.format(url=upstream.url))
        process = GatewayProcess(config)
        try:
            await asyncio.to_thread(process.start, proxy_port, admin_port)
            url = f"http://127.0.0.1:{proxy_port}/ws/echo?api_key=ws-secret"
            first = await session.ws_connect(url)
            await _echoes(first, "before the reload")
            process.signal(signal.SIGHUP)
            async with asyncio.timeout(10):
                while "config reloaded" not in process.stderr():
                    await asyncio.sleep(0.02)
            await _echoes(first, "after the reload")
            second = await session.ws_connect(url)
            await _echoes(second, "opened after the reload")

            assert process.proc is not None
            process.signal(signal.SIGTERM)
            signalled = time.monotonic()
            # Draining: both still relay until the drain period ends, then both are closed.
            ends: list[float] = []
            for ws in (first, second):
                async with asyncio.timeout(10):
                    while not ws.closed:
                        with contextlib.suppress(ConnectionError):
                            await ws.send_str("draining")
                        ended = await ws.receive()
                        if ended.type != aiohttp.WSMsgType.TEXT:
                            break
                        await asyncio.sleep(0.05)
                ends.append(time.monotonic() - signalled)
                await ws.close()
            exit_code = await asyncio.to_thread(process.proc.wait, 10)
            exited = time.monotonic() - signalled
            lines = [line for line in process.access_log() if line["status"] == 101]
            stderr = process.stderr()
        finally:
            process.close()
    assert exit_code == 0, stderr
    assert min(ends) >= 0.8, ends  # the 1 s drain period (less the loop clock's steps)
    assert exited < 6, exited  # the drain period and a busy machine's slack; not a timeout's
    assert len(lines) == 2, lines
    for line in lines:
        assert line["route"] == "/ws/{rest:path}" and line["key"] == "viewer"
        assert line["bytes_sent"] > 0 and line["bytes_received"] > 0, line
    assert "Traceback" not in stderr
