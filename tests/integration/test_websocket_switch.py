"""The upstream's answer to a WebSocket handshake, through a real gateway: what is a switch,
what is an ordinary answer, and what is a 502."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from tests.integration.test_websocket import (
    SWITCHED,
    gateway_and_upstream,
    handshake_before,
    ws_url,
)
from tests.support.raw_upstream import Peer

# What RFC 6455's sample key (the one `raw_handshake` sends) is answered with.
SAMPLE_ACCEPT = b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"


@pytest.mark.parametrize(
    "accept",
    [b"", b"Sec-WebSocket-Accept: dGhlIHNhbXBsZSBub25jZQ==\r\n", SAMPLE_ACCEPT * 2],
    ids=["none", "wrong", "twice"],
)
async def test_a_101_that_does_not_accept_the_key_is_a_502(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], accept: bytes
) -> None:
    """RFC 6455 4.1: a client fails a WebSocket whose 101 lacks the Sec-WebSocket-Accept of its
    key. The gateway relayed such a 101, the client gave up at once, and the access log and the
    metrics counted a switch (status 101, nothing carried) where the upstream had failed."""

    async def wrong_accept(peer: Peer) -> None:
        await peer.head()
        await peer.send(SWITCHED.replace(SAMPLE_ACCEPT, accept))
        await peer.reader.read()

    async with handshake_before(tmp_path, wrong_accept) as (upstream, reader, _):
        answer = await asyncio.wait_for(reader.read(), 10)
        # The upstream connection, switched already, is not kept.
        await asyncio.wait_for(upstream.closed.wait(), 10)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 "), answer
    assert b"Content-Type: application/problem+json" in head
    problem = json.loads(body)
    assert problem["code"] == "bad_gateway"
    assert "Sec-WebSocket-Accept" in problem["detail"]
    statuses: list[int] = []
    for _ in range(500):
        out = capsys.readouterr().out
        statuses += [json.loads(line)["status"] for line in out.splitlines() if line[:1] == "{"]
        if statuses:
            break
        await asyncio.sleep(0.01)
    assert statuses == [502]


@pytest.mark.parametrize("padding", [b"", b" "], ids=["exact", "spaced"])
async def test_a_101_that_accepts_the_key_is_switched(tmp_path: Path, padding: bytes) -> None:
    async def right_accept(peer: Peer) -> None:
        await peer.head()
        await peer.send(SWITCHED.replace(b": s3pP", b":" + padding + b" s3pP"))
        await peer.send(b"\x81\x02hi")  # a text frame, relayed as it came
        await peer.reader.read()

    async with handshake_before(tmp_path, right_accept) as (_, reader, _):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        first = await asyncio.wait_for(reader.readexactly(4), 10)
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert first == b"\x81\x02hi"


@pytest.mark.parametrize("status", [200, 404, 426])
async def test_an_upstream_that_does_not_switch_is_an_ordinary_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], status: int
) -> None:
    """Whatever the upstream answers but 101 reaches the client as that answer, and the
    connection then closes: what the client sends after an upgrade request is not HTTP."""

    async def answer(peer: Peer) -> None:
        await peer.head()
        await peer.send(b"HTTP/1.1 %d Nope\r\nContent-Length: 7\r\n\r\nno here" % status)
        await peer.reader.read()

    async with handshake_before(tmp_path, answer) as (_, reader, _):
        answered = await asyncio.wait_for(reader.read(), 10)  # to the close
    head, _, body = answered.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), answered
    assert b"\r\nConnection: close" in head
    assert body == b"no here"
    statuses: list[int] = []
    for _ in range(500):
        out = capsys.readouterr().out
        statuses += [json.loads(line)["status"] for line in out.splitlines() if line[:1] == "{"]
        if statuses:
            break
        await asyncio.sleep(0.01)
    assert statuses == [status]


async def test_refused_handshakes_are_problem_json_and_the_switch_costs_once(
    tmp_path: Path,
) -> None:
    async with gateway_and_upstream(tmp_path) as (gateway, upstream, session):
        for query, status in (("", 401), ("?api_key=ws-nothing", 401), ("?api_key=ws-off", 403)):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(ws_url(gateway, "/ws/echo" + query))
            assert refused.value.status == status
            assert refused.value.headers is not None
            assert refused.value.headers["Content-Type"] == "application/problem+json"
        for _ in range(2):  # the quota: two a day
            async with session.ws_connect(ws_url(gateway, "/ws/echo?api_key=ws-counted")) as ws:
                for number in range(3):
                    await ws.send_str(str(number))
                    assert await ws.receive_str() == str(number)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(ws_url(gateway, "/ws/echo?api_key=ws-counted"))
        assert refused.value.status == 429
        assert refused.value.headers is not None
        assert refused.value.headers["Content-Type"] == "application/problem+json"
        assert len(upstream.seen) == 2
