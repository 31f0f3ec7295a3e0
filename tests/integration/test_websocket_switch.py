"""The upstream's answer to a WebSocket handshake, through a real gateway: what is a switch,
what is an ordinary answer, and what is a 502."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.integration.test_websocket import SWITCHED, handshake_before
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
