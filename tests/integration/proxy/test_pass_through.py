"""What passes through `UpstreamPool.forward` unharmed, over real sockets: statuses, headers
(cleaned both ways), kept-alive upstream connections, and answers framed byte by byte upstream."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from yarl import URL

from gateway.proxy import ForwardResult
from tests.support.forwarding import REQUEST_ID, Front, UpstreamState, named, raw_lines
from tests.support.raw_upstream import Peer, keep_answering, raw_upstream


@pytest.mark.parametrize("status", [200, 304, 404, 500])
async def test_status_headers_and_body_pass_through(
    front: Front, client: aiohttp.ClientSession, status: int
) -> None:
    async with client.get(front.url / f"status/{status}") as response:
        body = await response.read()
        assert response.status == status
        assert response.headers["ETag"] == '"v1"'
        assert response.headers["X-Upstream"] == "yes"
        assert response.headers["X-Request-ID"] == REQUEST_ID
        assert response.headers["X-RateLimit-Limit"] == "10"
    if status == 304:
        assert body == b""
    else:
        assert response.reason == "Custom Reason"
        assert body == f"body-{status}".encode()
        assert response.headers["Content-Length"] == str(len(body))
    result = await front.outcome()
    assert isinstance(result, ForwardResult)
    assert (result.status, result.bytes_sent, result.error) == (status, len(body), None)
    assert 0 < result.upstream_seconds < 2


async def test_head_answer_keeps_its_content_length(
    front: Front, client: aiohttp.ClientSession
) -> None:
    async with client.head(front.url / "status/200") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(b"body-200"))
        assert await response.read() == b""


async def test_request_headers_reach_the_upstream_cleaned(
    front: Front, client: aiohttp.ClientSession, upstream: UpstreamState
) -> None:
    headers = [
        ("X-API-Key", "secret"),
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "drop me"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "h2c"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("X-Forwarded-For", "10.0.0.1"),
        ("X-Forwarded-Proto", "https"),
        ("Forwarded", "for=10.0.0.1;proto=https"),
        ("X-Request-ID", "client-id"),
        ("X-Custom", "one"),
        ("X-Custom", "two"),
        ("Accept", "application/json"),
    ]
    target = URL(
        f"{front.url}/echo/a%2fb/x/../c?x=1&api_key=secret&y=%20+&API_KEY=keep&api%5Fkey=s2&z",
        encoded=True,
    )
    # The test client adds no User-Agent, so none may appear upstream either.
    async with client.get(target, headers=headers, skip_auto_headers=["User-Agent"]) as response:
        assert response.status == 200
        echoed = await response.json()
    # The path in its normal form (README, "How a request is answered"), the query as sent.
    assert echoed["raw_path"] == "/base/echo/a%2Fb/c?x=1&y=%20+&API_KEY=keep&z"
    seen = echoed["headers"]
    names = {name.lower() for name, _ in seen}
    for dropped in (
        "x-api-key", "connection", "x-hop", "keep-alive", "proxy-connection", "te", "trailer",
        "upgrade", "proxy-authorization", "user-agent", "content-type", "content-length",
        "transfer-encoding",
    ):  # fmt: skip
        assert dropped not in names, dropped
    assert named(seen, "Host") == [f"127.0.0.1:{upstream.port}"]
    assert named(seen, "X-Forwarded-For") == ["10.0.0.1, 127.0.0.1"]
    assert named(seen, "X-Forwarded-Proto") == ["http"]
    assert named(seen, "X-Forwarded-Host") == [f"127.0.0.1:{front.url.port}"]
    assert named(seen, "Forwarded") == [
        f'for=10.0.0.1;proto=https, for=127.0.0.1;host="127.0.0.1:{front.url.port}";proto=http'
    ]
    assert named(seen, "X-Request-ID") == [REQUEST_ID]
    assert named(seen, "X-Custom") == ["one", "two"]
    assert named(seen, "Accept") == ["application/json"]
    assert echoed["body_exists"] is False


async def test_response_headers_reach_the_client_cleaned(
    front: Front, client: aiohttp.ClientSession
) -> None:
    async with client.get(front.url / "cookies") as response:
        assert await response.text() == "cookies"
        lines = raw_lines(response.raw_headers)
    assert named(lines, "Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert named(lines, "Cache-Control") == ["no-cache", "private"]
    assert named(lines, "X-Request-ID") == [REQUEST_ID]
    names = {name.lower() for name, _ in lines}
    assert not names & {"x-hop", "keep-alive", "proxy-authenticate", "transfer-encoding"}
    assert named(lines, "Connection") in ([], ["keep-alive"])


async def test_upstream_connections_are_kept_alive(
    front: Front, client: aiohttp.ClientSession
) -> None:
    ports = []
    for _ in range(3):
        async with client.get(front.url / "echo") as response:
            ports.append((await response.json())["peer_port"])
    assert len(set(ports)) == 1


# ------------------------------------------------ framing chosen byte by byte upstream


async def test_chunked_answer_reaches_the_client_reframed(
    front: Front, client: aiohttp.ClientSession
) -> None:
    async def script(peer: Peer) -> None:
        await peer.head()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await asyncio.sleep(0.05)
        await peer.send(b"6\r\n world\r\n0\r\n\r\n")
        await peer.reader.read()

    async with raw_upstream(script) as up:
        front.use(up.port)
        async with client.get(front.url / "x") as response:
            assert response.status == 200
            assert "Content-Length" not in response.headers
            assert await response.read() == b"hello world"


async def test_an_http_1_0_answer_with_transfer_encoding_is_not_kept_alive(
    front: Front, client: aiohttp.ClientSession
) -> None:
    """RFC 9112 6.1: such an answer must close its connection, `keep-alive` or not; it was
    put back in the pool and used for the next request."""
    answer = (
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    async with raw_upstream(keep_answering(answer, answer)) as up:
        front.use(up.port)
        for _ in range(2):
            async with client.get(front.url / "x") as response:
                assert await response.read() == b"hello"
    assert up.connections == 2


async def test_a_streamed_answer_keeps_the_connection_for_the_next_request(
    front: Front,
) -> None:
    """An answer sent on in chunks as it streamed from the upstream also said `Connection:
    close` to an HTTP/1.1 client: every streamed answer cost a new connection, and requests
    pipelined behind it were dropped unanswered. HTTP/1.0 still gets the end of the
    connection as the end of the body."""

    async def script(peer: Peer) -> None:
        while await peer.head():
            await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await asyncio.sleep(0.05)  # the head goes on before the body is whole
            await peer.send(b"0\r\n\r\n")

    async with raw_upstream(script) as up:
        front.use(up.port)
        reader, writer = await asyncio.open_connection(front.url.host, front.url.port)
        request = b"GET /x HTTP/1.1\r\nHost: front\r\n\r\n"
        writer.write(request * 2)  # pipelined
        answers = []
        try:
            for _ in range(2):
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10)
                answers.append((head, body))
        finally:
            writer.close()
        for head, body in answers:
            assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding: chunked" in head
            assert b"Connection: close" not in head
            assert body == b"5\r\nhello\r\n0\r\n\r\n"

        reader, writer = await asyncio.open_connection(front.url.host, front.url.port)
        writer.write(b"GET /x HTTP/1.0\r\nHost: front\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)  # to the end of the connection
        writer.close()
        assert b"Connection: close" in answer and answer.endswith(b"\r\n\r\nhello")


@pytest.mark.parametrize(
    ("method", "answer", "status", "body"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", 200, b""),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n", 204, b""),
        ("GET", b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n', 304, b""),
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 200, b"hello"),
    ],
)
async def test_answers_without_and_with_a_body_reach_the_client(
    front: Front,
    client: aiohttp.ClientSession,
    method: str,
    answer: bytes,
    status: int,
    body: bytes,
) -> None:
    async with raw_upstream(keep_answering(answer)) as up:
        front.use(up.port)
        async with client.request(method, front.url / "x") as response:
            assert response.status == status
            assert await response.read() == body
            if method == "HEAD":
                assert response.headers["Content-Length"] == "1234"
