"""The gateway's answers to requests as they come over the wire, end to end over real
sockets: a slow head or body (408), a malformed one, a body with an upgrade request, trailer
fields, X-Forwarded-Host from the target, keys with odd bytes or trailing whitespace, large
bodies both ways, and a body refused with its head.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from gateway import accesslog
from gateway.server import Worker
from tests.support.statuses import INFO, KEY, RATED, raw_status, read_all, url
from tests.support.upstream import Upstream


async def test_408_when_the_head_is_slow(
    gateway: Worker, capsys: pytest.CaptureFixture[str]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
    writer.write(b"GET /soccer/v5/x?api_key=secret-1 HTTP/1.1\r\nHost: t\r\n")  # no end
    await writer.drain()
    raw = await read_all(reader)  # read(-1) returns only once the gateway closed
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert b"application/problem+json" in head
    assert json.loads(body)["code"] == "request_timeout"
    # Logged as the request it was (its line had arrived), without the query; so is a head
    # refused once complete (two Host lines).
    two_hosts = b"POST /soccer/v5/y HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"
    assert await raw_status(gateway, two_hosts) == b"400"
    # A fragment is refused, and is no more logged than a query is: a key may be there too.
    fragment = b"GET /soccer/v5/z#api_key=secret-1 HTTP/1.1\r\nHost: t\r\n\r\n"
    assert await raw_status(gateway, fragment) == b"400"
    accesslog.flush_access_log()
    out = capsys.readouterr().out
    assert "secret-1" not in out
    lines = [json.loads(line) for line in out.splitlines() if line]
    assert [(line["method"], line["path"], line["status"]) for line in lines] == [
        ("GET", "/soccer/v5/x", 408),
        ("POST", "/soccer/v5/y", 400),
        ("GET", "/soccer/v5/z", 400),
    ]


async def test_408_when_the_body_stalls(gateway: Worker, upstream: Upstream) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
    writer.write(
        b"POST /soccer/v5/upload HTTP/1.1\r\nHost: t\r\nX-API-Key: secret-1\r\n"
        b"Content-Length: 100\r\n\r\n0123456789"
    )
    await writer.drain()
    raw = await read_all(reader)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert json.loads(body)["code"] == "request_timeout"


async def test_malformed_request_gets_problem_json(gateway: Worker) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
    writer.write(b"GET /soccer\x00 HTTP/1.1\r\nHost: t\r\n\r\n")
    await writer.drain()
    raw = await read_all(reader)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split(b" ")[1] == b"400"  # HTTP/1.0: the version was unreadable
    assert b"application/problem+json" in head
    assert json.loads(body)["code"] == "bad_request"


@pytest.mark.parametrize("framing", ["chunked", "length"])
@pytest.mark.parametrize("split", [False, True], ids=["one-write", "body-later"])
async def test_a_body_reaches_the_upstream_when_the_request_also_asks_to_upgrade(
    gateway: Worker, upstream: Upstream, framing: str, split: bool
) -> None:
    """`curl --http2 -d ...` over http:// asks for h2c with a body: the upgrade is ignored,
    the body is not (a parser stops at an upgrade request's head)."""
    if framing == "chunked":
        head_framing, body = b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"
    else:
        head_framing, body = b"Content-Length: 5\r\n", b"hello"
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
    head = (
        b"POST /soccer/v5/x HTTP/1.1\r\nHost: t\r\nX-API-Key: secret-1\r\n"
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n" + head_framing + b"\r\n"
    )
    if split:
        writer.write(head)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(body)
    else:
        writer.write(head + body)
    raw = await asyncio.wait_for(read_all(reader), 5)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 200 ")
    (seen,) = upstream.seen
    assert seen.body_size == 5
    assert "upgrade" not in {name.lower() for name, _ in seen.headers}


async def test_trailer_fields_are_no_headers(gateway: Worker, upstream: Upstream) -> None:
    """A chunked body's trailer can carry neither the key nor a header for the upstream."""

    async def post(head_key: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
        writer.write(  # in one write, so the trailer is parsed in the same read as the head
            b"POST /soccer/v5/x HTTP/1.1\r\nHost: t\r\n%bTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\n"
            b"X-API-Key: secret-1\r\nX-Injected: evil\r\n\r\n" % head_key
        )
        raw = await read_all(reader)
        writer.close()
        return raw.split(b"\r\n", 1)[0]

    assert b" 401 " in await post(b"")
    assert upstream.seen == []
    assert b" 200 " in await post(b"X-API-Key: secret-1\r\n")
    (seen,) = upstream.seen
    assert "x-injected" not in {name.lower() for name, _ in seen.headers}
    assert seen.body_size == 5


@pytest.mark.parametrize(
    ("target", "forwarded_host"),
    [
        (b"http://shop.example:8443/soccer/v5/x", "shop.example:8443"),
        (b"http://shop.example/soccer/v5/x", "shop.example"),
        (b"http://[::1]:8080/soccer/v5/x", "[::1]:8080"),
        (b"/soccer/v5/x", "front.example"),
        # Hosts httptools' URL parser refused, so that the whole target was routed (a 404).
        (b"http://shop_api/soccer/v5/x", "shop_api"),
        (b"http://shop~1.example/soccer/v5/x", "shop~1.example"),
        (b"http://shop.example:/soccer/v5/x", "shop.example"),
        (b"http://shop.example:08443/soccer/v5/x", "shop.example:8443"),
    ],
    ids=["with-port", "absolute", "ipv6", "origin", "underscore", "tilde", "empty-port", "zero"],
)
async def test_x_forwarded_host_is_the_host_the_request_named(
    gateway: Worker, upstream: Upstream, target: bytes, forwarded_host: str
) -> None:
    # In absolute-form the target's host wins over the Host header (RFC 9112 3.2.2).
    head = b"GET %b HTTP/1.1\r\nHost: front.example\r\nX-API-Key: secret-1\r\n"
    head += b"Connection: close\r\n\r\n"
    assert await raw_status(gateway, head % target) == b"200"
    (seen,) = upstream.seen
    assert seen.path_qs == "/base/soccer/v5/x"
    assert [v for n, v in seen.headers if n.lower() == "x-forwarded-host"] == [forwarded_host]


async def test_a_key_that_is_not_utf8_is_unknown(gateway: Worker) -> None:
    """401, as any unknown key; it was a 500 with a traceback, free for anyone to cause."""
    head = b"GET %b HTTP/1.1\r\nHost: t\r\nX-API-Key: secr\xe9t-1\r\nConnection: close\r\n\r\n"
    assert await raw_status(gateway, head % INFO.encode()) == b"401"


@pytest.mark.parametrize("after", [b" ", b"\t", b" \t "])
async def test_whitespace_after_a_key_or_request_id_is_not_part_of_it(
    gateway: Worker, upstream: Upstream, after: bytes
) -> None:
    head = (
        b"GET %b HTTP/1.1\r\nHost: t\r\nX-API-Key: secret-1%b\r\n"
        b"X-Request-ID: mine-42%b\r\nConnection: close\r\n\r\n"
    ) % (INFO.encode(), after, after)
    assert await raw_status(gateway, head) == b"200"
    (seen,) = upstream.seen
    assert ("X-Request-ID", "mine-42") in seen.headers


async def test_large_bodies_stream_both_ways(
    gateway: Worker, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    size = 40 * 1024 * 1024
    received = 0
    async with client.get(url(gateway, f"/soccer/v5/big?bytes={size}"), headers=KEY) as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == str(size)
        async for chunk in r.content.iter_any():
            received += len(chunk)
    assert received == size

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(size // 65536):
            yield b"y" * 65536

    headers = {**KEY, "Content-Length": str(size)}
    async with client.post(url(gateway, "/soccer/v5/upload"), headers=headers, data=upload()) as r:
        assert r.status == 200
        assert (await r.json())["body_size"] == size


async def test_a_body_refused_with_its_head_is_400_and_charged_nothing(
    gateway: Worker, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    """Bad chunk framing in the same write as the head: the parser refuses the body before
    the limits are reached, so the request was never valid HTTP and takes nothing (it was
    charged and half sent upstream)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
    try:
        writer.write(
            b"POST /soccer/v5/upload HTTP/1.1\r\nHost: t\r\nX-API-Key: secret-rated\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nZZ\r\nabc\r\n0\r\n\r\n"
        )
        answer = await asyncio.wait_for(reader.read(), 5)  # it closes after the 400
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"x-ratelimit-remaining" not in head.lower()
    assert json.loads(body)["code"] == "bad_request"
    async with client.get(url(gateway, "/soccer/v5/next"), headers=RATED) as response:
        assert response.status == 200
        assert response.headers["X-RateLimit-Remaining"] == "99"  # its own request only
    assert [seen.path_qs for seen in upstream.seen] == ["/base/soccer/v5/next"]
