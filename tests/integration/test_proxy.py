"""UpstreamPool.forward over real sockets: a real upstream, a real front server, a real client."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from gateway.config.model import AuthConfig, Product, Upstream
from gateway.http.errors import HttpError
from gateway.http.headers import request_drop_set
from gateway.http.request import Request
from gateway.problems import PROBLEM_CONTENT_TYPE, GatewayProblem
from gateway.proxy import ForwardResult, UpstreamPool, forward
from tests.support.apps import serving_app
from tests.support.front import answer_problem, as_problem, serving
from tests.support.raw_upstream import Peer, Script, keep_answering, raw_upstream
from tests.support.sockets import closed_port, unaccepting_port

REQUEST_ID = "req-0001"
EXTRA_HEADERS = {"X-Request-ID": REQUEST_ID, "X-RateLimit-Limit": "10"}
MB = 1024 * 1024


# --------------------------------------------------------------------------- upstream


@dataclass
class UpstreamState:
    port: int = 0
    seen: list[dict[str, Any]] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


STATE = web.AppKey("state", UpstreamState)


async def _upstream_handler(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    path = request.path.removeprefix("/base")
    if path.startswith("/status/"):
        status = int(path.rsplit("/", 1)[1])
        headers = {"ETag": '"v1"', "X-Upstream": "yes"}
        if status == 304:
            return web.Response(status=304, headers=headers)
        return web.Response(
            status=status, reason="Custom Reason", body=f"body-{status}", headers=headers
        )
    if path == "/upload":
        digest, size = hashlib.sha256(), 0
        try:
            async for chunk in request.content.iter_any():
                digest.update(chunk)
                size += len(chunk)
        except BaseException:
            state.cancelled.set()
            raise
        return web.json_response(
            {
                "size": size,
                "sha256": digest.hexdigest(),
                "headers": [[k.decode(), v.decode()] for k, v in request.raw_headers],
            }
        )
    if path == "/download":
        total = int(request.query["size"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = total
        await response.prepare(request)
        try:
            for chunk in _pattern(total):
                await response.write(chunk)
        except BaseException:
            state.cancelled.set()
            raise
        await response.write_eof()
        return response
    if path == "/slow":
        try:
            await asyncio.sleep(float(request.query["for"]))
        except asyncio.CancelledError:
            state.cancelled.set()
            raise
        return web.Response(text="late")
    if path == "/drip":
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            for _ in range(100):
                await response.write(b"drip\n")
                await asyncio.sleep(0.05)
        except BaseException:
            state.cancelled.set()
            raise
        return response
    if path == "/cookies":
        response = web.Response(text="cookies")
        for name, value in (
            ("Set-Cookie", "a=1; Path=/"),
            ("Set-Cookie", "b=2; Path=/"),
            ("Cache-Control", "no-cache"),
            ("Cache-Control", "private"),
            ("Connection", "X-Hop"),
            ("X-Hop", "drop me"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authenticate", "Basic"),
            ("X-Request-ID", "upstream-id"),
        ):
            response.headers.add(name, value)
        return response
    # Anything else echoes what arrived.
    body = await request.read()
    peer = request.transport.get_extra_info("peername") if request.transport else None
    state.seen.append({"raw_path": request.raw_path, "headers": request.raw_headers})
    return web.json_response(
        {
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[k.decode(), v.decode()] for k, v in request.raw_headers],
            "body": body.decode(),
            "body_exists": request.body_exists,
            "peer_port": peer[1] if peer else None,
        }
    )


@asynccontextmanager
async def running_echo_upstream() -> AsyncIterator[UpstreamState]:
    """An upstream under /base that echoes what arrived, except on the paths of
    `_upstream_handler` that answer with a status, stream, stall or set headers."""
    state = UpstreamState()
    app = web.Application()
    app[STATE] = state
    app.router.add_route("*", "/{tail:.*}", _upstream_handler)
    async with serving_app(app) as state.port:
        yield state


# ----------------------------------------------------------------------------- front


@dataclass
class Front:
    url: URL
    pool: UpstreamPool
    product: Product
    body_timeout: float = 5.0
    outcomes: list[ForwardResult | BaseException] = field(default_factory=list)

    def use(self, port: int, **upstream: Any) -> None:
        changed = dataclasses.replace(self.product.upstream, port=port, **upstream)
        self.product = dataclasses.replace(self.product, upstream=changed)

    async def outcome(self) -> ForwardResult | BaseException:
        for _ in range(200):
            if self.outcomes:
                return self.outcomes[-1]
            await asyncio.sleep(0.01)
        raise AssertionError("the front handler never finished")


def _product(port: int) -> Product:
    upstream = Upstream(
        url=f"http://127.0.0.1:{port}/base",
        scheme="http",
        host="127.0.0.1",
        port=port,
        base_path="/base",
        connect_timeout=1.0,
        timeout=2.0,
    )
    return Product(name="soccer", upstream=upstream, routes=())


@asynccontextmanager
async def running_front(upstream_port: int) -> AsyncIterator[Front]:
    pool = UpstreamPool()
    auth = AuthConfig(header="X-API-Key", query_param="api_key")
    drop = request_drop_set(auth.header)
    front: Front | None = None

    async def handle(request: Request) -> None:
        assert front is not None
        try:
            result = await forward(
                request,
                pool.destination(front.product),
                drop,
                auth.query_param,
                REQUEST_ID,
                front.body_timeout,
                EXTRA_HEADERS,
            )
        except (GatewayProblem, HttpError) as error:
            problem = as_problem(error)
            front.outcomes.append(problem)
            answer_problem(request, problem, REQUEST_ID)
            return
        except BaseException as exc:
            front.outcomes.append(exc)
            raise
        front.outcomes.append(result)

    try:
        async with serving(handle) as port:
            front = Front(URL(f"http://127.0.0.1:{port}"), pool, _product(upstream_port))
            yield front
    finally:
        await pool.close()


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamState]:
    async with running_echo_upstream() as state:
        yield state


@pytest.fixture
async def front(upstream: UpstreamState) -> AsyncIterator[Front]:
    async with running_front(upstream.port) as running:
        yield running


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def _raw(headers: Any) -> list[tuple[str, str]]:
    return [(name.decode(), value.decode()) for name, value in headers]


def _named(lines: list[tuple[str, str]] | list[list[str]], name: str) -> list[str]:
    return [value for key, value in lines if key.lower() == name.lower()]


# ------------------------------------------------------------------------ pass-through


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
        ("X-Request-ID", "client-id"),
        ("X-Custom", "one"),
        ("X-Custom", "two"),
        ("Accept", "application/json"),
    ]
    target = URL(
        f"{front.url}/echo/a%2Fb/../c?x=1&api_key=secret&y=%20+&API_KEY=keep&api%5Fkey=s2&z",
        encoded=True,
    )
    # The test client adds no User-Agent, so none may appear upstream either.
    async with client.get(target, headers=headers, skip_auto_headers=["User-Agent"]) as response:
        assert response.status == 200
        echoed = await response.json()
    assert echoed["raw_path"] == "/base/echo/a%2Fb/../c?x=1&y=%20+&API_KEY=keep&z"
    seen = echoed["headers"]
    names = {name.lower() for name, _ in seen}
    for dropped in (
        "x-api-key", "connection", "x-hop", "keep-alive", "proxy-connection", "te", "trailer",
        "upgrade", "proxy-authorization", "user-agent", "content-type", "content-length",
        "transfer-encoding",
    ):  # fmt: skip
        assert dropped not in names, dropped
    assert _named(seen, "Host") == [f"127.0.0.1:{upstream.port}"]
    assert _named(seen, "X-Forwarded-For") == ["10.0.0.1, 127.0.0.1"]
    assert _named(seen, "X-Forwarded-Proto") == ["http"]
    assert _named(seen, "X-Forwarded-Host") == [f"127.0.0.1:{front.url.port}"]
    assert _named(seen, "X-Request-ID") == [REQUEST_ID]
    assert _named(seen, "X-Custom") == ["one", "two"]
    assert _named(seen, "Accept") == ["application/json"]
    assert echoed["body_exists"] is False


async def test_response_headers_reach_the_client_cleaned(
    front: Front, client: aiohttp.ClientSession
) -> None:
    async with client.get(front.url / "cookies") as response:
        assert await response.text() == "cookies"
        lines = _raw(response.raw_headers)
    assert _named(lines, "Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert _named(lines, "Cache-Control") == ["no-cache", "private"]
    assert _named(lines, "X-Request-ID") == [REQUEST_ID]
    names = {name.lower() for name, _ in lines}
    assert not names & {"x-hop", "keep-alive", "proxy-authenticate", "transfer-encoding"}
    assert _named(lines, "Connection") in ([], ["keep-alive"])


async def test_upstream_connections_are_kept_alive(
    front: Front, client: aiohttp.ClientSession
) -> None:
    ports = []
    for _ in range(3):
        async with client.get(front.url / "echo") as response:
            ports.append((await response.json())["peer_port"])
    assert len(set(ports)) == 1


# ------------------------------------------------------------------------ big bodies


def _pattern(total: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """`total` bytes of a non-repeating-looking pattern, generated chunk by chunk."""
    block = hashlib.sha256(b"seed").digest() * (2 * chunk // 32)
    sent, index = 0, 0
    while sent < total:
        size = min(chunk, total - sent)
        offset = (index * 7919) % chunk
        part = struct.pack(">Q", index) + block[offset : offset + size - 8]
        yield part[:size]
        sent += size
        index += 1


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@asynccontextmanager
async def _peak_rss() -> AsyncIterator[list[int]]:
    peak = [_rss()]

    async def sample() -> None:
        while True:
            peak.append(_rss())
            await asyncio.sleep(0.01)

    task = asyncio.create_task(sample())
    try:
        yield peak
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


async def test_big_bodies_stream_both_ways_without_buffering(
    front: Front, client: aiohttp.ClientSession
) -> None:
    size = 50 * MB
    sent_digest = hashlib.sha256()

    async def upload() -> AsyncIterator[bytes]:
        for chunk in _pattern(size):
            sent_digest.update(chunk)
            yield chunk

    before = _rss()
    async with _peak_rss() as samples:
        async with client.post(
            front.url / "upload", data=upload(), headers={"Content-Length": str(size)}
        ) as response:
            assert response.status == 200
            uploaded = await response.json()
        received_digest, received = hashlib.sha256(), 0
        async with client.get(front.url / "download", params={"size": size}) as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == str(size)
            async for chunk in response.content.iter_any():
                received_digest.update(chunk)
                received += len(chunk)
    assert uploaded["size"] == size
    assert uploaded["sha256"] == sent_digest.hexdigest()
    # A body with a length keeps it: the upstream sees no chunked encoding.
    assert _named(uploaded["headers"], "Content-Length") == [str(size)]
    assert _named(uploaded["headers"], "Transfer-Encoding") == []
    assert received == size
    assert received_digest.hexdigest() == hashlib.sha256(b"".join(_pattern(size))).hexdigest()
    growth = max(samples) - before
    assert growth < 20 * MB, f"RSS grew by {growth / MB:.1f} MB while streaming 50 MB"


async def test_chunked_upload_stays_chunked(front: Front, client: aiohttp.ClientSession) -> None:
    async def upload() -> AsyncIterator[bytes]:
        for chunk in _pattern(MB):
            yield chunk

    async with client.post(front.url / "upload", data=upload()) as response:
        uploaded = await response.json()
    assert uploaded["size"] == MB
    assert uploaded["sha256"] == hashlib.sha256(b"".join(_pattern(MB))).hexdigest()
    assert _named(uploaded["headers"], "Transfer-Encoding") == ["chunked"]
    assert _named(uploaded["headers"], "Content-Length") == []


async def test_small_body_and_method_pass_through(
    front: Front, client: aiohttp.ClientSession
) -> None:
    async with client.put(front.url / "echo", data=b"hello") as response:
        echoed = await response.json()
    assert (echoed["method"], echoed["body"]) == ("PUT", "hello")
    assert _named(echoed["headers"], "Content-Length") == ["5"]


# ---------------------------------------------------------------------------- 502/504


async def _problem(client: aiohttp.ClientSession, url: URL) -> tuple[int, dict[str, Any]]:
    async with client.get(url) as response:
        assert response.headers["Content-Type"] == PROBLEM_CONTENT_TYPE
        return response.status, await response.json()


async def test_refused_connection_is_bad_gateway(
    front: Front, client: aiohttp.ClientSession
) -> None:
    port = closed_port()
    front.use(port)
    status, problem = await _problem(client, front.url / "x")
    assert (status, problem["code"]) == (502, "bad_gateway")
    assert "soccer" in problem["detail"]
    assert "refused" in problem["detail"]
    # Neither internals nor the upstream's address reach the client.
    assert "Traceback" not in problem["detail"]
    assert str(port) not in problem["detail"]


async def _close_at_once(peer: Peer) -> None:
    await peer.head()
    peer.writer.close()


async def _reset(peer: Peer) -> None:
    await peer.head()
    sock = peer.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.writer.transport.abort()


async def _garbage(peer: Peer) -> None:
    await peer.head()
    await peer.send(b"SSH-2.0-OpenSSH_9.6\r\nnot http at all\r\n\r\n")
    await asyncio.sleep(0.5)


@pytest.mark.parametrize("behaviour", [_close_at_once, _reset, _garbage])
async def test_broken_upstream_is_bad_gateway(
    front: Front, client: aiohttp.ClientSession, behaviour: Script
) -> None:
    async with raw_upstream(behaviour) as up:
        front.use(up.port)
        status, problem = await _problem(client, front.url / "x")
    assert (status, problem["code"]) == (502, "bad_gateway")
    assert "soccer" in problem["detail"]


async def test_no_connection_in_time_is_gateway_timeout(
    front: Front, client: aiohttp.ClientSession
) -> None:
    with unaccepting_port() as port:
        front.use(port, connect_timeout=0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, problem = await _problem(client, front.url / "x")
        elapsed = loop.time() - started
    assert (status, problem["code"]) == (504, "gateway_timeout")
    assert "connection" in problem["detail"].lower()
    assert elapsed < 1.5


async def test_slow_response_head_is_gateway_timeout(
    front: Front, client: aiohttp.ClientSession, upstream: UpstreamState
) -> None:
    front.use(upstream.port, timeout=0.2)
    status, problem = await _problem(client, front.url.with_path("/slow").with_query({"for": 3}))
    assert (status, problem["code"]) == (504, "gateway_timeout")
    # The gateway gave up on the request: the upstream sees its connection go.
    await asyncio.wait_for(upstream.cancelled.wait(), 2)


async def test_upstream_not_taking_the_body_is_gateway_timeout(
    front: Front, client: aiohttp.ClientSession
) -> None:
    async def never_read(peer: Peer) -> None:
        await peer.head()
        await asyncio.sleep(10)

    async def endless() -> AsyncIterator[bytes]:
        chunk = b"x" * 65536
        for _ in range(2048):
            yield chunk

    async with raw_upstream(never_read) as up:
        front.use(up.port, timeout=0.3)
        async with client.post(front.url / "upload", data=endless()) as response:
            assert response.status == 504
            problem = await response.json()
    assert "request body" in problem["detail"]


# -------------------------------------------------------------- after the head: cut short


async def _dies_mid_length(peer: Peer) -> None:
    await peer.head()
    await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"a" * 100)


async def _dies_mid_chunks(peer: Peer) -> None:
    await peer.head()
    await peer.send(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n" + b"a" * 100 + b"\r\n"
    )


async def _stalls_mid_body(peer: Peer) -> None:
    await peer.head()
    await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"a" * 100)
    await asyncio.sleep(10)


@pytest.mark.parametrize("behaviour", [_dies_mid_length, _dies_mid_chunks, _stalls_mid_body])
async def test_upstream_failing_mid_body_cuts_the_answer_short(
    front: Front, client: aiohttp.ClientSession, behaviour: Script
) -> None:
    async with raw_upstream(behaviour) as up:
        front.use(up.port, timeout=0.3)
        async with client.get(front.url / "x", timeout=aiohttp.ClientTimeout(total=3)) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        result = await front.outcome()
    assert isinstance(result, ForwardResult)
    assert result.status == 200
    assert result.error is not None
    assert "soccer" in result.error
    assert result.bytes_sent == 100


# --------------------------------------------------------------------- client's fault


async def test_client_leaving_cancels_the_upstream_request(
    front: Front, client: aiohttp.ClientSession, upstream: UpstreamState
) -> None:
    url = front.url.with_path("/slow").with_query({"for": 5})
    with pytest.raises(asyncio.TimeoutError):
        await client.get(url, timeout=aiohttp.ClientTimeout(total=0.3))
    await asyncio.wait_for(upstream.cancelled.wait(), 2)
    assert isinstance(await front.outcome(), asyncio.CancelledError)


async def test_client_leaving_mid_answer_closes_the_upstream_connection(
    front: Front, client: aiohttp.ClientSession, upstream: UpstreamState
) -> None:
    response = await client.get(front.url / "drip")
    assert await response.content.readline() == b"drip\n"
    response.close()
    await asyncio.wait_for(upstream.cancelled.wait(), 2)
    outcome = await front.outcome()
    assert isinstance(outcome, asyncio.CancelledError | ConnectionError)


async def test_client_not_reading_the_answer_is_cut_off(
    front: Front, upstream: UpstreamState
) -> None:
    front.body_timeout = 0.3
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (front.url.host, front.url.port))
    _reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(f"GET /download?size={100 * MB} HTTP/1.1\r\nHost: front\r\n\r\n".encode())
        await writer.drain()
        result = await front.outcome()
    finally:
        writer.close()
    assert isinstance(result, ForwardResult)
    assert result.error is not None and "stopped reading" in result.error
    assert result.bytes_sent < 100 * MB
    await asyncio.wait_for(upstream.cancelled.wait(), 2)


async def test_stalled_request_body_is_request_timeout(
    front: Front, upstream: UpstreamState
) -> None:
    front.body_timeout = 0.2
    reader, writer = await asyncio.open_connection(front.url.host, front.url.port)
    try:
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: front\r\nContent-Length: 100\r\n\r\n" + b"b" * 10
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        rest = await asyncio.wait_for(reader.read(), 3)  # the gateway closes the connection
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 408 ")
    assert b"connection: close" in head.lower()
    assert json.loads(rest)["code"] == "request_timeout"
    # What the upstream had of the body is abandoned with its connection.
    await asyncio.wait_for(upstream.cancelled.wait(), 2)


async def test_malformed_request_body_is_bad_request(front: Front, upstream: UpstreamState) -> None:
    reader, writer = await asyncio.open_connection(front.url.host, front.url.port)
    try:
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: front\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.05)  # the body is on its way upstream when it turns bad
        writer.write(b"zz\r\n")  # not a chunk size
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        rest = await asyncio.wait_for(reader.read(), 3)  # the gateway closes the connection
    finally:
        writer.close()
    # The client is still there: it is told what was wrong (not cut off, nor logged as gone).
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in head.lower()
    assert json.loads(rest)["code"] == "bad_request"
    assert isinstance(await front.outcome(), GatewayProblem)
    await asyncio.wait_for(upstream.cancelled.wait(), 2)


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
