"""An upstream that answers `Keep-Alive: timeout=N` closes a connection idle N seconds (Node.js's
keepAliveTimeout): the pool does not reuse one after N - 1 s idle, as undici does, so that a
request does not cross that close on the wire, a 502 for one that cannot be sent again (see
test_stale_connections). A value without a readable timeout, or one beyond the pool's own
limit, changes nothing."""

from __future__ import annotations

import asyncio

import pytest

from gateway.http.client import KEEP_ALIVE_MARGIN, HttpClient
from tests.support.forwarding import Front, product_at, statuses_on_one_connection
from tests.support.raw_upstream import Peer, Script, raw_upstream

# What the upstream gives a connection idle with nothing on its way before it closes it outright,
# beyond its announced timeout (see _closing_when_idle).
LATE_CLOSE = 0.5
ORDER = b'{"order": 1}'  # each POST's body


def _closing_when_idle(keep_alive: bytes | None, idle_close: float) -> Script:
    """Answers each request (its body framed by Content-Length) with `Keep-Alive: keep_alive`,
    and keeps a connection open for `idle_close` seconds after an answer. A request whose first
    byte comes later crossed the upstream's close on the wire: the connection ends without an
    answer. That is the side of the race a real server's idle timer loses at random, made certain
    (the close itself waits LATE_CLOSE longer, so that the gateway cannot have seen it first)."""
    line = b"" if keep_alive is None else b"Keep-Alive: " + keep_alive + b"\r\n"
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + line + b"\r\nok"

    async def script(peer: Peer) -> None:
        loop = asyncio.get_running_loop()
        while True:
            answered = loop.time()
            try:
                async with asyncio.timeout(idle_close + LATE_CLOSE):
                    first = await peer.reader.readexactly(1)
            except TimeoutError:
                return  # closed idle
            if loop.time() - answered >= idle_close:
                return  # closed as the request came: it is lost, unanswered
            head = first + await peer.head()
            length = 0
            for header in head.split(b"\r\n"):
                name, _, value = header.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await peer.reader.readexactly(length)
            await peer.send(answer)

    return script


async def _posts(front: Front, pauses: list[float]) -> list[int]:
    """POSTs on one client connection, at once and then each `pause` after the answer before."""
    return await asyncio.to_thread(
        statuses_on_one_connection, front.url.port or 0, "POST", ORDER, pauses
    )


async def test_posts_paced_at_the_upstreams_close_all_succeed(front: Front) -> None:
    """`timeout=1`: each POST comes as the upstream closes the connection the one before it
    used (the upstream's idle timer brought forward to 0.1 s, so that the test need not wait
    the whole second). Reused (the pool kept connections 30 s, whatever the upstream said),
    the second was a 502; a connection is not reused at all after such an answer."""
    async with raw_upstream(_closing_when_idle(b"timeout=1", 0.1)) as up:
        front.use(up.port)
        statuses = await _posts(front, [0.15, 0.15])
    assert statuses == [200, 200, 200]
    assert up.connections == 3


async def test_a_connection_is_reused_within_a_second_less_than_the_announced_timeout(
    front: Front,
) -> None:
    """`timeout=2`: reused 0.2 s later, though the pool holds it no longer than 2 - 1 s after
    the answer (read from the pool rather than waited for: a second's wait per run)."""
    async with raw_upstream(_closing_when_idle(b"timeout=2", 2.0)) as up:
        front.use(up.port)
        statuses = await _posts(front, [0.2])
        assert statuses == [200, 200]
        assert up.connections == 1
        client = HttpClient(product_at(up.port).upstream)
        try:
            reply = await client.send("GET", "/x", [(b"Host", b"upstream")], None)
            reply.keep_alive(b"timeout=2")  # as the proxy tells it, from the answer's head
            while await reply.read():
                pass
            reply.finish()
            [idle] = client._idle
            assert idle.reuse_until is not None
            assert idle.reuse_until - idle.idle_since == pytest.approx(2 - KEEP_ALIVE_MARGIN)
        finally:
            await client.close()


@pytest.mark.parametrize(
    ("keep_alive", "connections"),
    [
        (None, 1),
        (b"max=100", 1),
        (b"timeout=abc", 1),
        (b"timeout=-3", 1),
        (b"timeout=5s", 1),
        (b"timeout=", 1),
        (b"timeout=99999999999999999999", 1),
        (b"timeout=5, max=1000", 1),
        (b"timeout=0", 3),
        (b"max=100, timeout=1", 3),
    ],
)
async def test_what_a_keep_alive_value_changes(
    front: Front, keep_alive: bytes | None, connections: int
) -> None:
    """POSTs at once one after the other: reused unless the value's timeout is 0 or 1 s."""
    async with raw_upstream(_closing_when_idle(keep_alive, 10.0)) as up:
        front.use(up.port)
        statuses = await _posts(front, [0.0, 0.0])
    assert statuses == [200, 200, 200]
    assert up.connections == connections
