"""When forwarding fails, over real sockets: 502 and 504 before the answer's head, an answer
cut short after it, and the client's own faults (gone, not reading, stalling, malformed body)."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from yarl import URL

from gateway.problems import PROBLEM_CONTENT_TYPE, GatewayProblem
from gateway.proxy import ForwardResult
from tests.support.forwarding import MB, Front, UpstreamState
from tests.support.raw_upstream import Peer, Script, raw_upstream
from tests.support.sockets import closed_port, unaccepting_port

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


def _answers(head: bytes) -> Script:
    async def answer(peer: Peer) -> None:
        await peer.head()
        await peer.send(head)
        await asyncio.sleep(0.5)

    return answer


@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        # A chunk size past any length: the body fails before one byte of it is read, so the
        # client can still get a 502 (it got an empty reply, logged as a 200).
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"FFFFFFFFFFFFFFFFFFFF1\r\nhello\r\n",
            "invalid",
        ),
        (b"HTTP/1.1 099 X\r\nContent-Length: 2\r\n\r\nok", "status 99 is not one of"),
        (b"HTTP/1.1 600 X\r\nContent-Length: 2\r\n\r\nok", "status 600 is not one of"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzzzz",
            "Transfer-Encoding other than chunked",
        ),
    ],
    ids=["bad-first-chunk", "status-99", "status-600", "gzip-coding"],
)
async def test_an_answer_the_client_could_misread_is_bad_gateway(
    front: Front, client: aiohttp.ClientSession, answer: bytes, detail: str
) -> None:
    async with raw_upstream(_answers(answer)) as up:
        front.use(up.port, timeout=1.0)
        status, problem = await _problem(client, front.url / "x")
    assert (status, problem["code"]) == (502, "bad_gateway")
    assert detail in problem["detail"]


async def test_a_204_loses_the_content_length_its_upstream_gave_it(
    front: Front, client: aiohttp.ClientSession
) -> None:
    answer = b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nX-Kept: yes\r\n\r\nhello"
    async with raw_upstream(_answers(answer)) as up:
        front.use(up.port)
        async with client.get(front.url / "x") as response:
            assert response.status == 204
            assert "Content-Length" not in response.headers
            assert response.headers["X-Kept"] == "yes"


async def test_an_upstreams_trailer_fields_are_not_headers(
    front: Front, client: aiohttp.ClientSession
) -> None:
    """Read in the same read as the head, they were passed on as header lines."""
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\nTransfer-Encoding: gzip\r\n\r\n"
    )
    async with raw_upstream(_answers(answer)) as up:
        front.use(up.port)
        async with client.get(front.url / "x") as response:
            assert response.status == 200
            assert "X-Trailer" not in response.headers
            assert await response.read() == b"hello"


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


# Small kernel buffers on the upstream's side: a body read slowly is taken slowly.
_SMALL_BUFFERS = {"receive_buffer": 4096, "max_segment": 536}


def _reads_slowly(size: int, read_for: list[float]) -> Script:
    """Reads the body 4 KiB at a time, one read every 20 ms (~200 KB/s at best); answers
    with how much arrived once `size` bytes have. `read_for` gets how long that took."""

    async def script(peer: Peer) -> None:
        await peer.head()
        loop = asyncio.get_running_loop()
        started, received = loop.time(), 0
        while received < size and (piece := await peer.reader.read(4096)):
            received += len(piece)
            await asyncio.sleep(0.02)
        read_for.append(loop.time() - started)
        body = b"%d" % received
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))

    return script


async def _uploaded(size: int) -> AsyncIterator[bytes]:
    for _ in range(size // 65536):
        yield b"u" * 65536


async def test_upstream_reading_the_body_slowly_but_steadily_is_not_cut_off(
    front: Front, client: aiohttp.ClientSession
) -> None:
    """The upload takes the upstream seconds, several times `upstream.timeout`, but it takes
    bytes all along: only an upstream that takes nothing for that long is cut off."""
    size, read_for = 384 * 1024, list[float]()
    async with raw_upstream(_reads_slowly(size, read_for), **_SMALL_BUFFERS) as up:
        front.use(up.port, timeout=0.5)
        async with client.post(
            front.url / "upload",
            data=_uploaded(size),
            headers={"Content-Length": str(size)},
            timeout=aiohttp.ClientTimeout(total=30),
        ) as response:
            assert response.status == 200
            assert await response.read() == b"%d" % size
    assert read_for[0] > 1.0  # twice the timeout at least: the test tests what it says


async def test_upstream_that_stops_reading_the_body_is_gateway_timeout(
    front: Front, client: aiohttp.ClientSession
) -> None:
    async def stops_reading(peer: Peer) -> None:
        await peer.head()
        for _ in range(16):  # 64 KiB, slowly, then no more
            await peer.reader.read(4096)
            await asyncio.sleep(0.02)
        await asyncio.sleep(10)

    async with raw_upstream(stops_reading, **_SMALL_BUFFERS) as up:
        front.use(up.port, timeout=0.5)
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with client.post(front.url / "upload", data=_uploaded(128 * MB)) as response:
            assert response.status == 504
            problem = await response.json()
        elapsed = loop.time() - started
    assert problem["code"] == "gateway_timeout"
    assert "did not accept the request body within 0.5s" in problem["detail"]
    # Its reads end after ~0.3 s; found out one or two allowances of 0.5 s later.
    assert elapsed < 5


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


async def _endless_trailer(peer: Peer) -> None:
    await peer.head()
    await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n")
    for index in range(100):  # 100 KiB of trailer fields, in reads of their own
        await peer.send(b"X-Trailer-%03d: %s\r\n" % (index, b"t" * 1000))
        await asyncio.sleep(0.002)
    await peer.send(b"\r\n")
    await peer.reader.read()


async def _endless_chunk_extension(peer: Peer) -> None:
    await peer.head()
    await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1;x=")
    for _ in range(100):  # 100 KiB of one chunk's extension, in reads of their own
        await peer.send(b"e" * 1000)
        await asyncio.sleep(0.002)
    await peer.reader.read()


@pytest.mark.parametrize(
    ("behaviour", "sent", "error"),
    [
        (_dies_mid_length, 100, "soccer"),
        (_dies_mid_chunks, 100, "soccer"),
        (_stalls_mid_body, 100, "soccer"),
        # Upstreams are held to what clients are: a trailer section over 64 KiB cuts the
        # answer (100 MB of trailer fields were read to the end, the connection then reused).
        (_endless_trailer, 5, "trailer section is over"),
        (_endless_chunk_extension, 5, "chunk's size line is over"),
    ],
)
async def test_upstream_failing_mid_body_cuts_the_answer_short(
    front: Front, client: aiohttp.ClientSession, behaviour: Script, sent: int, error: str
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
    assert error in result.error
    assert result.bytes_sent == sent


async def test_an_answer_cut_short_is_a_reset_to_an_http_1_0_client(front: Front) -> None:
    """An HTTP/1.0 client reads the body to the connection's end: the cut answer's
    connection closed with a FIN, so the truncated body looked whole (curl exited 0)."""
    async with raw_upstream(_dies_mid_length) as up:
        front.use(up.port, timeout=0.3)
        reader, writer = await asyncio.open_connection(front.url.host, front.url.port)
        try:
            writer.write(b"GET /x HTTP/1.0\r\nHost: front\r\n\r\n")
            received = b""
            with pytest.raises(ConnectionResetError):
                while chunk := await asyncio.wait_for(reader.read(65536), 10):
                    received += chunk
        finally:
            writer.close()
    assert received.startswith(b"HTTP/1.1 200 ")


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


async def test_client_reading_slowly_but_steadily_is_not_cut_off(
    front: Front, upstream: UpstreamState
) -> None:
    """It reads all along, but the kernel's send queue (megabytes on loopback) takes it longer
    than the timeout to empty by half, which a blocked write waits for: not a stall."""
    front.body_timeout = 0.5
    size = 8 * MB
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, (front.url.host, front.url.port))
    try:
        request = f"GET /download?size={size} HTTP/1.1\r\nHost: front\r\n\r\n".encode()
        await loop.sock_sendall(sock, request)
        received = 0
        while piece := await loop.sock_recv(sock, 64 * 1024):  # ~3 MB/s at most
            received += len(piece)
            if received >= size:
                break
            await asyncio.sleep(0.02)
        result = await front.outcome()
    finally:
        sock.close()
    assert isinstance(result, ForwardResult)
    assert result.error is None
    assert result.bytes_sent == size


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
