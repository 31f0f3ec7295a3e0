"""WebSocket proxying: an aiohttp WebSocket upstream reached through a real gateway by an
aiohttp WebSocket client, with keys and limits on the handshake and bytes both ways after it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from gateway.server import Worker
from tests.support.config import worker_server_yaml, write_config
from tests.support.gateway import running_gateway
from tests.support.operations import Scrape
from tests.support.raw_upstream import Peer, RawUpstream, Script, raw_upstream
from tests.support.upstream import Upstream, running_upstream

API = """
products:
  live:
    upstream: {{url: "{url}"}}
    routes:
      - path: /ws/{{rest:path}}
        websocket: true
      - path: /plain/{{rest:path}}
  plainws:
    upstream: {{url: "{url}/ws"}}
    routes:
      - path: /nows/{{rest:path}}
  metered:
    upstream: {{url: "{url}/ws"}}
    routes:
      - path: /metered/{{rest:path}}
        websocket: true
        cost_header: X-Units-Used
plans:
  open: {{}}
  two_a_day:
    quota: {{limit: 2, per: day}}
keys:
  - {{name: viewer, key: ws-secret, plans: {{live: open, plainws: open}}}}
  - {{name: counted, key: ws-counted, plans: {{live: two_a_day, metered: two_a_day}}}}
  - {{name: stopped, key: ws-off, disabled: true, plans: {{live: open}}}}
"""

MIB = 1024 * 1024


@asynccontextmanager
async def gateway_and_upstream(
    tmp_path: Path, **config: str
) -> AsyncIterator[tuple[Worker, Upstream, aiohttp.ClientSession]]:
    async with running_upstream() as upstream:
        server = worker_server_yaml(**config)
        directory = write_config(tmp_path, API.format(url=upstream.url), server=server)
        async with running_gateway(directory) as gateway, aiohttp.ClientSession() as session:
            yield gateway, upstream, session


def ws_url(gateway: Worker, path: str) -> str:
    return f"http://127.0.0.1:{gateway.proxy_port}{path}"


async def websocket_lines(
    capsys: pytest.CaptureFixture[str], count: int
) -> list[dict[str, object]]:
    """The access-log lines of WebSockets (status 101), once there are `count` of them: a
    WebSocket is recorded when both of its connections are gone, a moment after a peer sees
    its end."""
    out = ""
    for _ in range(500):
        out += capsys.readouterr().out
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        switched = [line for line in lines if line["status"] == 101]
        if len(switched) >= count:
            return switched
        await asyncio.sleep(0.01)
    raise AssertionError(f"not {count} WebSocket lines in the access log:\n{out}")


async def counted_requests(
    session: aiohttp.ClientSession, gateway: Worker
) -> dict[tuple[str, ...], float]:
    """gateway_requests_total by route and status (the in-process registry outlives tests)."""
    return (await scrape(session, gateway)).series("gateway_requests_total", "route", "status")


async def scrape(session: aiohttp.ClientSession, gateway: Worker) -> Scrape:
    async with session.get(f"http://127.0.0.1:{gateway.admin_port}/metrics") as answer:
        return Scrape(await answer.text())


async def test_echo_text_binary_ping_large_and_close_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with gateway_and_upstream(tmp_path) as (gateway, upstream, session):
        before = (await scrape(session, gateway)).series(
            "gateway_websocket_bytes_total", "product", "direction"
        )
        async with session.ws_connect(
            ws_url(gateway, "/ws/echo?api_key=ws-secret&room=1"),
            headers={"X-Request-ID": "ws-test-1"},
            protocols=("chat",),
            autoping=False,
            max_msg_size=8 * MIB,
        ) as ws:
            assert ws.protocol == "chat"
            await ws.send_str("hello")
            assert await ws.receive_str() == "hello"
            await ws.send_bytes(b"\x00\x01\xff")
            assert await ws.receive_bytes() == b"\x00\x01\xff"
            await ws.ping(b"are you there")
            pong = await ws.receive()
            assert (pong.type, pong.data) == (aiohttp.WSMsgType.PONG, b"are you there")
            big = bytes(range(256)) * (4 * 1024)  # 1 MiB
            await ws.send_bytes(big)
            assert await ws.receive_bytes() == big
            await ws.close(code=4001, message=b"done here")
        # Closed through the tunnel, the upstream saw the client's own code.
        for _ in range(100):
            if upstream.ws_closed:
                break
            await asyncio.sleep(0.01)
        assert upstream.ws_closed == [4001]

        async with session.ws_connect(ws_url(gateway, "/ws/echo?api_key=ws-secret")) as ws:
            await ws.send_str("close 4002")
            closing = await ws.receive()
            assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 4002
        first, second = await websocket_lines(capsys, 2)
        after = (await scrape(session, gateway)).series(
            "gateway_websocket_bytes_total", "product", "direction"
        )
    seen = upstream.seen[0]
    assert seen.path_qs == "/ws/echo?room=1"  # the key is not passed on
    headers = {name.lower(): value for name, value in seen.headers}
    assert headers["upgrade"].lower() == "websocket" and headers["connection"] == "Upgrade"
    assert headers["x-request-id"] == "ws-test-1"
    assert "sec-websocket-key" in headers
    assert first["request_id"] == "ws-test-1" and first["key"] == "viewer"
    assert first["route"] == "/ws/{rest:path}" and first["code"] == "upstream"
    assert isinstance(first["bytes_sent"], int) and first["bytes_sent"] > MIB
    assert isinstance(first["bytes_received"], int) and first["bytes_received"] > MIB
    assert isinstance(second["bytes_received"], int) and second["bytes_received"] < 1024
    for direction, field in (("up", "bytes_received"), ("down", "bytes_sent")):
        grown = after[("live", direction)] - before.get(("live", direction), 0)
        assert grown == first[field] + second[field]  # type: ignore[operator]


async def test_handshake_walks_the_request_path_and_is_charged_once(tmp_path: Path) -> None:
    async with gateway_and_upstream(tmp_path) as (gateway, upstream, session):
        before = await counted_requests(session, gateway)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(ws_url(gateway, "/ws/echo"))
        assert refused.value.status == 401
        # One quota unit per WebSocket, however many messages it carries.
        for _ in range(2):
            async with session.ws_connect(ws_url(gateway, "/ws/echo?api_key=ws-counted")) as ws:
                for number in range(5):
                    await ws.send_str(str(number))
                    assert await ws.receive_str() == str(number)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(ws_url(gateway, "/ws/echo?api_key=ws-counted"))
        assert refused.value.status == 429
        assert len(upstream.seen) == 2
        counted = await counted_requests(session, gateway)
        for status, count in (("101", 2), ("429", 1), ("401", 1)):
            key = ("/ws/{rest:path}", status)
            assert counted[key] - before.get(key, 0) == count


async def test_a_websocket_costs_what_its_upstreams_101_reports(tmp_path: Path) -> None:
    """A route's cost_header is read from the 101 (README "Metering"): the quota of two a
    day is used up by one WebSocket that reported 2, and the next is refused."""
    async with gateway_and_upstream(tmp_path) as (gateway, _, session):
        url = ws_url(gateway, "/metered/echo?api_key=ws-counted&cost=2")
        async with session.ws_connect(url) as ws:
            await ws.send_str("hi")
            assert await ws.receive_str() == "hi"
        usage = f"http://127.0.0.1:{gateway.admin_port}/admin/usage/counted"
        for _ in range(200):
            async with session.get(usage) as answer:
                used = (await answer.json())["products"]["metered"]["quota"]["used"]
            if used == 2:
                break
            await asyncio.sleep(0.01)
        assert used == 2
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url)
        assert refused.value.status == 429


async def test_upgrade_on_a_route_without_websocket_is_answered_as_a_request(
    tmp_path: Path,
) -> None:
    async with gateway_and_upstream(tmp_path) as (gateway, upstream, session):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(ws_url(gateway, "/nows/echo?api_key=ws-secret"))
        # The upstream was asked without Upgrade, so it refused as it would any plain GET.
        assert refused.value.status == 400
        # Then the connection closes: what a client sends after an upgrade request is not HTTP.
        assert refused.value.headers is not None
        assert refused.value.headers.get("Connection") == "close"
        headers = {name.lower() for name, _ in upstream.seen[0].headers}
        assert "upgrade" not in headers
        assert upstream.seen[0].path_qs == "/ws/nows/echo"


def raw_handshake(version: bytes) -> bytes:
    """A WebSocket handshake for /ws/echo, as bytes (RFC 6455's sample key)."""
    return (
        b"GET /ws/echo?api_key=ws-secret HTTP/%b\r\nHost: live\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    ) % version


async def test_an_http_1_0_client_is_not_switched(tmp_path: Path) -> None:
    """HTTP/1.0 knows no 101: the handshake gets an ordinary answer, and the connection ends."""
    async with gateway_and_upstream(tmp_path) as (gateway, upstream, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
        writer.write(raw_handshake(b"1.0"))
        answer = await asyncio.wait_for(reader.read(), 5)  # to the close
        writer.close()
    assert not answer.startswith(b"HTTP/1.1 101 ")
    headers = {name.lower() for name, _ in upstream.seen[0].headers}
    assert "upgrade" not in headers


async def test_upstream_refusing_the_switch_is_passed_on(tmp_path: Path) -> None:
    async with gateway_and_upstream(tmp_path) as (gateway, _, session):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(ws_url(gateway, "/ws/refuse?api_key=ws-secret"))
        assert refused.value.status == 403
        # The connection answered so is not kept: what follows an upgrade request is not HTTP.
        assert refused.value.headers is not None
        assert refused.value.headers.get("Connection") == "close"


@asynccontextmanager
async def handshake_before(
    tmp_path: Path, script: Script, **config: str
) -> AsyncIterator[tuple[RawUpstream, asyncio.StreamReader, asyncio.StreamWriter]]:
    """A gateway (`config`: worker_server_yaml's) in front of an upstream that answers by
    `script`, and a client connection to it that has sent a WebSocket handshake."""
    async with raw_upstream(script) as upstream:
        url = f"http://127.0.0.1:{upstream.port}"
        server = worker_server_yaml(**config)
        directory = write_config(tmp_path, API.format(url=url), server=server)
        async with running_gateway(directory) as gateway:
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
            writer.write(raw_handshake(b"1.1"))
            try:
                yield upstream, reader, writer
            finally:
                writer.close()


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\r\n",
    ],
    ids=["no-connection", "no-upgrade"],
)
async def test_a_101_that_does_not_name_the_switch_is_a_502(tmp_path: Path, head: bytes) -> None:
    """A 101 without Upgrade and Connection: upgrade (RFC 9110 7.8) went to the client as a 101
    with headers the upstream never sent, then the connection ended: a broken WebSocket that
    the log and the metrics counted as a successful switch."""

    async def sloppy(peer: Peer) -> None:
        await peer.head()
        await peer.send(head)
        await peer.reader.read()

    async with handshake_before(tmp_path, sloppy) as (_, reader, _):
        answer = await asyncio.wait_for(reader.read(), 10)
    assert answer.startswith(b"HTTP/1.1 502 "), answer
    assert b"without Upgrade and Connection: upgrade" in answer


@pytest.mark.parametrize(
    ("upgrade", "switched"),
    [(b"h2c", False), (b"websocket, h2c", False), (b"WebSocket", True), (b" websocket ", True)],
)
async def test_a_101_to_a_protocol_not_asked_for_is_a_502(
    tmp_path: Path, upgrade: bytes, switched: bool
) -> None:
    """RFC 9110 7.8: a server may switch only to a protocol the request named. A 101 to h2c for
    a WebSocket handshake was relayed, and the client handed a tunnel speaking another one."""

    async def other(peer: Peer) -> None:
        await peer.head()
        await peer.send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n")
        await peer.send(b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n")
        await peer.send(b"Upgrade: %b\r\n\r\n" % upgrade)
        await peer.reader.read()

    async with handshake_before(tmp_path, other) as (_, reader, _):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    if switched:
        assert head.startswith(b"HTTP/1.1 101 "), head
    else:
        assert head.startswith(b"HTTP/1.1 502 "), head


async def test_a_client_gone_before_the_switch_is_a_499_and_cancels_the_upstream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reading from the client paused at its upgrade request, until the tunnel: a client that
    left before the upstream's answer went unnoticed, the upstream request went on (up to the
    upstream's timeout), and a 101 into a dead connection was recorded rather than a 499."""
    asked = asyncio.Event()

    async def slow_to_switch(peer: Peer) -> None:
        await peer.head()
        asked.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await peer.reader.read()  # the gateway gives the request up: closed
                return
        await peer.send(SWITCHED)

    async with handshake_before(tmp_path, slow_to_switch) as (upstream, _, writer):
        await asyncio.wait_for(asked.wait(), 5)
        writer.close()  # gone before the 101
        started = time.monotonic()
        await asyncio.wait_for(upstream.closed.wait(), 15)
        assert time.monotonic() - started < 5, "the upstream request was not cancelled"
        lines = []
        for _ in range(500):
            out = capsys.readouterr().out
            lines += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            if lines:
                break
            await asyncio.sleep(0.01)
    (line,) = lines
    assert (line["status"], line["code"]) == (499, "client_closed")


SWITCHED = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


async def test_client_vanishing_ends_the_upstream_side_and_is_logged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with gateway_and_upstream(tmp_path) as (gateway, upstream, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
        writer.write(raw_handshake(b"1.1"))
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
        assert b"\r\nX-Request-ID: " in head
        writer.transport.abort()  # gone without a close frame
        for _ in range(200):
            if upstream.ws_closed:
                break
            await asyncio.sleep(0.01)
        assert upstream.ws_closed and upstream.ws_closed[0] != 1000
        (line,) = await websocket_lines(capsys, 1)
    assert line["bytes_received"] == 0


async def test_idle_websocket_is_closed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with gateway_and_upstream(tmp_path, websocket_idle="300ms") as (gateway, _, session):
        async with session.ws_connect(ws_url(gateway, "/ws/echo?api_key=ws-secret")) as ws:
            # The tunnel's last activity is the echo passing through it: after this send and
            # before the echo is read here, however late a busy machine lets this test read it.
            quiet_from = time.monotonic()
            await ws.send_str("one")
            assert await ws.receive_str() == "one"
            async with asyncio.timeout(10):
                ended = await ws.receive()
            quiet = time.monotonic() - quiet_from
        assert ended.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSE)
        assert quiet >= 0.29
        (line,) = await websocket_lines(capsys, 1)
    assert line["bytes_received"] and line["bytes_sent"]


async def test_slow_reader_holds_back_the_upstream(tmp_path: Path) -> None:
    total = 64 * MIB
    async with gateway_and_upstream(tmp_path) as (gateway, upstream, session):
        async with session.ws_connect(
            ws_url(gateway, f"/ws/flood?api_key=ws-secret&bytes={total}"),
            max_msg_size=2 * MIB,
        ) as ws:
            # The client reads nothing for a while: whatever the gateway would buffer for
            # it shows up as write buffers of its client-side transports.
            await asyncio.sleep(0.5)
            stalled_at = upstream.flood_sent
            await asyncio.sleep(0.3)
            assert upstream.flood_sent == stalled_at, "the upstream was not held back"
            assert stalled_at < total // 2
            assert gateway._proxy_server is not None
            buffered = sum(
                connection.transport.get_write_buffer_size()
                for connection in gateway._proxy_server.connections
                if connection.transport is not None
            )
            assert buffered <= MIB
            received = 0
            while received < total:
                message = await ws.receive_bytes()
                assert message == b"f" * MIB
                received += len(message)
        assert received == total


async def test_shutdown_closes_websockets_after_the_drain_period(tmp_path: Path) -> None:
    async with running_upstream() as upstream:
        server = worker_server_yaml(drain_timeout="400ms")
        directory = write_config(tmp_path, API.format(url=upstream.url), server=server)
        async with running_gateway(directory) as gateway, aiohttp.ClientSession() as session:
            ws = await session.ws_connect(ws_url(gateway, "/ws/echo?api_key=ws-secret"))
            proxy_server = gateway._proxy_server
            assert proxy_server is not None
            started = time.monotonic()  # the drain period begins after this
            drain = asyncio.create_task(gateway.drain())
            async with asyncio.timeout(5):
                while not proxy_server.draining:
                    await asyncio.sleep(0.005)
            # Draining: still relaying.
            await ws.send_str("still here")
            assert await ws.receive_str() == "still here"
            async with asyncio.timeout(10):
                ended = await ws.receive()
            assert ended.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSE)
            # Not before the 400 ms drain period (less the event loop clock's coarseness).
            assert time.monotonic() - started >= 0.3
            await drain
            await ws.close()


async def test_an_ended_tunnel_leaves_no_cycle(tmp_path: Path) -> None:
    """Nothing of a WebSocket is left for the cyclic collector once it has ended: a reload
    pauses that collector and freezes what is alive (gateway.reload.freeze_long_lived)."""
    ours = {"Tunnel", "TunnelEnd", "TunnelResult", "ServerConnection", "HttpConnection"}
    async with gateway_and_upstream(tmp_path) as (gateway, upstream, session):
        async with session.ws_connect(ws_url(gateway, "/ws/echo?api_key=ws-secret")) as ws:
            await ws.send_str("warm")
            assert await ws.receive_str() == "warm"
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            async with session.ws_connect(ws_url(gateway, "/ws/echo?api_key=ws-secret")) as ws:
                await ws.send_str("hi")
                assert await ws.receive_str() == "hi"
            for _ in range(100):  # until the gateway has seen both sides go
                if len(upstream.ws_closed) == 2:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            gc.collect()
            kept = {type(thing).__name__ for thing in gc.garbage} & ours
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert kept == set()


@pytest.mark.parametrize(
    "protocols",
    [
        b"websocket, x\xe2\x82\xac",
        b"websocket, caf\xc3\xa9",
        b"websocket, x\xff",
        b"websocket, h2c",
        b"h2c, WebSocket",
    ],
)
async def test_the_upstream_is_asked_for_websocket_alone(tmp_path: Path, protocols: bytes) -> None:
    """Whatever else the client's Upgrade names, the upstream is asked to switch to WebSocket
    only. Offered `websocket, h2c`, an upstream that speaks h2c switched to it, and the tunnel
    carried HTTP/2 requests for any path, none of them routed, checked or metered (h2c
    smuggling). (Forwarded as sent, a value beyond Latin-1 was also a 500 once.)"""
    seen: list[bytes] = []

    async def switch_to_h2c_if_asked(peer: Peer) -> None:
        head = await peer.head()
        seen.append(head)
        switched = b"h2c" if b"h2c" in head.lower() else b"websocket"
        await peer.send(SWITCHED.replace(b"Upgrade: websocket", b"Upgrade: " + switched))
        await peer.reader.read()

    async with raw_upstream(switch_to_h2c_if_asked) as upstream:
        url = f"http://127.0.0.1:{upstream.port}"
        directory = write_config(tmp_path, API.format(url=url), server=worker_server_yaml())
        async with running_gateway(directory) as gateway:
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
            writer.write(raw_handshake(b"1.1").replace(b"websocket", protocols))
            try:
                answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            finally:
                writer.close()
    assert answer.startswith(b"HTTP/1.1 101 "), answer
    assert b"\r\nUpgrade: websocket\r\n" in answer
    assert b"\r\nUpgrade: websocket\r\n" in seen[0]
    assert b"h2c" not in seen[0].lower()


async def test_a_101_reaches_the_client_without_the_upstreams_content_length(
    tmp_path: Path,
) -> None:
    """README: a 1xx loses the Content-Length an upstream gave it. The 101 kept it, and a
    client reading it would take the upstream's first frames for the 101's body."""

    async def switch_with_length(peer: Peer) -> None:
        await peer.head()
        await peer.send(SWITCHED.replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\nhello"))
        await peer.reader.read()

    async with handshake_before(tmp_path, switch_with_length) as (_, reader, _):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        first = await asyncio.wait_for(reader.readexactly(5), 5)
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert b"content-length" not in head.lower()
    assert first == b"hello"  # the new protocol's bytes, relayed as they came
