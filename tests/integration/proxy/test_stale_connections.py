"""A kept-alive upstream connection that the upstream closed as a request went out on it (the
race of its keep-alive timeout with the request): the request is sent again, once, on a fresh
connection when that is harmless, as nginx does: an idempotent method, and a body, if any, small
enough to be kept for it. Otherwise the client gets the 502."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import pytest

from gateway.config.model import Upstream
from gateway.http.client import HttpClient, ReplayableBody
from gateway.http.errors import ServerDisconnected
from tests.support.forwarding import Front, statuses_on_one_connection
from tests.support.raw_upstream import Peer, Script, raw_upstream

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def _request_body(peer: Peer) -> bytes:
    """Read one request (its body framed by Content-Length); its body."""
    head = await peer.head()
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return await peer.reader.readexactly(length)


def _stale_once(bodies: list[bytes], *, read_body: bool = False) -> Script:
    """The first connection answers one request, then closes once the next one's head (and
    with `read_body` its body) is in, without a byte of answer; every later connection answers
    each request. Each body answered is noted in `bodies`."""
    connections = 0

    async def script(peer: Peer) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:
            bodies.append(await _request_body(peer))
            await peer.send(OK)
            await (_request_body(peer) if read_body else peer.head())
            return  # closed: a reset, with the body unread
        while True:
            bodies.append(await _request_body(peer))
            await peer.send(OK)

    return script


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
async def test_an_idempotent_request_with_a_body_is_sent_again_on_a_fresh_connection(
    front: Front, method: str
) -> None:
    """It was a 502: only requests without a body were sent again."""
    body = b'{"name": "acme", "plan": "gold"}'
    bodies: list[bytes] = []
    async with raw_upstream(_stale_once(bodies)) as up:
        front.use(up.port)
        statuses = await asyncio.to_thread(
            statuses_on_one_connection, front.url.port or 0, method, body, [0.0]
        )
    assert statuses == [200, 200]
    assert bodies == [body, body]  # the second whole, on the second connection
    assert up.connections == 2


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_a_request_that_is_not_idempotent_is_not_sent_again(
    front: Front, method: str
) -> None:
    bodies: list[bytes] = []
    async with raw_upstream(_stale_once(bodies)) as up:
        front.use(up.port)
        statuses = await asyncio.to_thread(
            statuses_on_one_connection, front.url.port or 0, method, b"{}", [0.0]
        )
    assert statuses == [200, 502]
    assert up.connections == 1


class _Pieces:
    """A body source that goes on where an abandoned iteration stopped, as the proxy's does."""

    def __init__(self, pieces: Iterable[bytes]) -> None:
        self._left = list(pieces)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._each()

    async def _each(self) -> AsyncIterator[bytes]:
        while self._left:
            yield self._left.pop(0)


@pytest.mark.parametrize(("pieces", "retried"), [(2, True), (3, False)])
async def test_a_body_is_sent_again_only_when_it_was_kept_whole(pieces: int, retried: bool) -> None:
    """Kept up to the replay limit (here 64 KiB): a larger body, taken past it before the
    connection failed, cannot be sent again."""
    piece = b"p" * 30000
    bodies: list[bytes] = []
    async with raw_upstream(_stale_once(bodies, read_body=True)) as up:
        upstream = Upstream(
            url=f"http://127.0.0.1:{up.port}",
            scheme="http",
            host="127.0.0.1",
            port=up.port,
            base_path="",
            connect_timeout=1.0,
            timeout=2.0,
        )
        client = HttpClient(upstream)
        try:
            for attempt in range(2):
                body = ReplayableBody(_Pieces([piece] * pieces), limit=64 * 1024)
                headers = [(b"Host", b"up"), (b"Content-Length", b"%d" % (len(piece) * pieces))]
                if attempt == 1 and not retried:
                    with pytest.raises(ServerDisconnected, match="closed without an answer"):
                        await client.send("PUT", "/x", headers, body)
                    break
                reply = await client.send("PUT", "/x", headers, body)
                assert (reply.status, await reply.read()) == (200, b"ok")
                reply.finish()
        finally:
            await client.close()
    assert bodies == [piece * pieces] * (2 if retried else 1)
    assert up.connections == (2 if retried else 1)
