"""What an answered request leaves behind, end to end over real sockets: no reference cycle
for any status or for a client that left, no client kept by a pooled upstream connection, no
old upstream client kept by a reload.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import weakref
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from gateway.server import Worker
from tests.support.statuses import INFO, KEY, read_all, url


@pytest.mark.parametrize(
    ("path", "status"),
    [
        (INFO, 200),
        ("/nowhere", 404),
        ("/soccer/v3/x", 410),
        ("/soccer/v4/xx/competitions/sr:competition:1/info.json", 400),
        ("/refused/x", 502),
        ("/soccer/v5/x/slow?for=3", 504),  # the upstream connection is cut
    ],
)
async def test_an_answered_request_leaves_no_cycle(gateway: Worker, path: str, status: int) -> None:
    """Nothing of a request, its connection or its upstream connection is left for the cyclic
    collector. Only that collector would free a reference cycle, and a reload pauses it and
    then freezes what is alive (gateway.reload.freeze_long_lived): a cycle made during a
    reload, holding a request and through it the config it was served with, would keep that
    old config for good."""

    async def once(key: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
        writer.write(
            b"GET %b HTTP/1.1\r\nHost: t\r\nX-API-Key: %b\r\nConnection: close\r\n\r\n"
            % (path.encode(), key)
        )
        raw = await read_all(reader)
        writer.close()
        await writer.wait_closed()
        return raw.split(b"\r\n", 1)[0]

    expected = b" %d " % status
    assert expected in await once(b"secret-1")  # warm: lazy imports, first connections

    async def twice() -> None:
        assert expected in await once(b"secret-1")
        assert (await once(b"wrong")).startswith(b"HTTP/1.1 4")  # 401, or the route's own 4xx
        await asyncio.sleep(0.05)  # the gateway's side of the closes

    kept = await cyclic_garbage_of(twice)
    assert kept == [], kept


async def cyclic_garbage_of(action: Callable[[], Awaitable[None]]) -> list[str]:
    """The types of what `action` left for the cyclic collector (and only it) to free."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        await action()
        gc.collect()
        return sorted({type(thing).__name__ for thing in gc.garbage})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


@pytest.mark.parametrize(
    "head",
    [
        # leaves while the upstream is answering (a 499)
        b"GET /soccer/v5/x/slow?for=3 HTTP/1.1\r\nHost: t\r\nX-API-Key: secret-1\r\n\r\n",
        # leaves in the middle of its body
        b"POST /soccer/v5/x HTTP/1.1\r\nHost: t\r\nX-API-Key: secret-1\r\n"
        b"Content-Length: 100\r\n\r\n0123456789",
        # leaves with a pipelined request behind the one being answered
        b"GET /soccer/v5/x/slow?for=3 HTTP/1.1\r\nHost: t\r\nX-API-Key: secret-1\r\n\r\n"
        b"GET /soccer/v5/x HTTP/1.1\r\nHost: t\r\nX-API-Key: secret-1\r\n\r\n",
        # leaves in the middle of a streamed answer it does not read
        b"GET /soccer/v5/x/big?bytes=100000000 HTTP/1.1\r\nHost: t\r\nX-API-Key: secret-1\r\n\r\n",
    ],
    ids=["waiting-for-upstream", "mid-body", "pipelined", "mid-answer"],
)
async def test_a_request_whose_client_left_leaves_no_cycle(gateway: Worker, head: bytes) -> None:
    """A soak audit found every connection whose client left before its answer kept alive
    for good (its request queued on it, pointing back at it, frozen by the next reload): a
    worker grew ~40 MB an hour. Nothing may be left for the cyclic collector."""

    async def leave_early() -> None:
        _reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
        writer.write(head)
        await writer.drain()
        await asyncio.sleep(0.1)  # the request is on its way upstream, or its body is
        writer.transport.abort()
        await asyncio.sleep(0.1)  # the gateway's side: the handler cancelled, recorded

    await leave_early()  # warm: lazy imports, first connections
    kept = await cyclic_garbage_of(leave_early)
    assert kept == [], kept


async def test_a_pooled_upstream_connection_does_not_keep_its_last_client(
    gateway: Worker,
) -> None:
    """An upstream connection back in the pool held its last request's interim-answer hook, a
    method of that request's client connection: the client's connection object, long gone,
    stayed alive until the upstream connection was used again or closed."""
    server = gateway._proxy_server
    assert server is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
    writer.write(b"GET %b HTTP/1.1\r\nHost: t\r\nX-API-Key: secret-1\r\n\r\n" % INFO.encode())
    assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
    [connection] = server.connections
    gone = weakref.ref(connection)
    del connection
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.05)  # the gateway's side of the close
    gc.collect()
    assert gone() is None


async def test_a_reload_that_changes_an_upstream_retires_its_old_client(
    gateway: Worker, client: aiohttp.ClientSession
) -> None:
    """A soak audit found every reload that changed an https upstream left its client (and a
    TLS context, ~830 KB) in the pool for good. The old client finishes what it carries."""
    runtime = gateway.runtime
    config = runtime.snapshot.config
    old_client = weakref.ref(runtime.snapshot.destinations["soccer"].client)
    slow = asyncio.ensure_future(client.get(url(gateway, "/soccer/v5/x/slow?for=0.3"), headers=KEY))
    await asyncio.sleep(0.1)  # on its way, through the old client
    soccer = config.products["soccer"]
    upstream = dataclasses.replace(soccer.upstream, timeout=soccer.upstream.timeout + 1)
    products = {**config.products, "soccer": dataclasses.replace(soccer, upstream=upstream)}
    runtime.apply(dataclasses.replace(config, products=products))
    async with await slow as response:
        assert response.status == 200
    async with client.get(url(gateway, INFO), headers=KEY) as response:
        assert response.status == 200  # through the new client
    assert len(runtime.upstreams._clients) == len(products)
    del slow, response
    await asyncio.sleep(0.05)  # its connection, closed as it came back, is gone
    gc.collect()
    held = old_client()
    assert held is None, [type(r).__name__ for r in gc.get_referrers(held)]
