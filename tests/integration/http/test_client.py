"""The upstream HTTP client (gateway.http.client) against upstreams whose every byte the test
chooses: framing, interim answers, the request it sends, flow control. Its failures (stale
connections, timeouts, broken answers) are in test_client_failures.py.

Each upstream here is a raw asyncio server: it reads request heads (and bodies, where a test
sends one) and writes exactly the bytes under test, so framing, interim answers, closes and
stalls are what the test says, not what some HTTP library would do.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.http.errors import (
    MalformedResponse,
)
from tests.support.raw_upstream import Peer, Script, keep_answering, raw_upstream
from tests.support.upstream_client import HOST, body_chunks, client_for, fetch

MB = 1024 * 1024


# ------------------------------------------------------------------------------ framing


async def test_content_length_body_and_keep_alive() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Up: 1\r\n\r\nhello"
    async with raw_upstream(keep_answering(answer, answer)) as up, client_for(up.port) as client:
        reply = await client.send("GET", "/x", HOST, None)
        assert (reply.status, reply.reason, reply.headers["X-Up"]) == (200, "OK", "1")
        assert await body_chunks(reply) == [b"hello"]
        reply.finish()
        assert await fetch(client) == (200, b"hello")
    assert up.connections == 1


async def test_chunked_body_is_dechunked_chunk_by_chunk() -> None:
    async def script(peer: Peer) -> None:
        for _ in range(2):
            await peer.head()
            await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await asyncio.sleep(0.05)
            await peer.send(b"6\r\n world\r\n")
            await asyncio.sleep(0.05)
            await peer.send(b"0\r\n\r\n")
        await peer.reader.read()

    async with raw_upstream(script) as up, client_for(up.port) as client:
        reply = await client.send("GET", "/x", HOST, None)
        assert reply.headers["Transfer-Encoding"] == "chunked"
        assert not reply.done
        # The parser's pieces are handed on as they come, never joined.
        assert await body_chunks(reply) == [b"hello", b" world"]
        reply.finish()
        assert await fetch(client) == (200, b"hello world")
    assert up.connections == 1


async def test_a_chunked_bodys_trailer_fields_are_kept_on_its_reply() -> None:
    """Not headers, but read once the body is done (a reported cost); none on the next."""
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    async with (
        raw_upstream(
            keep_answering(
                answer + b"0\r\nX-Units-Used: 7\r\nX-Other:  a b \r\n\r\n",
                answer + b"0\r\n\r\n",
            )
        ) as up,
        client_for(up.port) as client,
    ):
        reply = await client.send("GET", "/x", HOST, None)
        assert await body_chunks(reply) == [b"hello"]
        # As the parser read them (a value's trailing whitespace is its reader's to strip).
        assert reply.trailer_lines == ((b"X-Units-Used", b"7"), (b"X-Other", b"a b "))
        assert "X-Units-Used" not in reply.headers
        reply.finish()
        reply = await client.send("GET", "/x", HOST, None)
        assert await body_chunks(reply) == [b"hello"]
        assert reply.trailer_lines == ()
        reply.finish()
    assert up.connections == 1


async def test_body_without_length_ends_with_the_connection() -> None:
    async def script(peer: Peer) -> None:
        await peer.head()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ")
        await peer.send(b"close")

    async with raw_upstream(script) as up, client_for(up.port) as client:
        assert await fetch(client) == (200, b"until close")
        assert await fetch(client) == (200, b"until close")
    assert up.connections == 2  # such a connection cannot serve another request


async def test_head_answer_has_no_body_whatever_its_length_says() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
    full = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def script(peer: Peer) -> None:
        while True:
            asked = await peer.head()
            await peer.send(head if asked.startswith(b"HEAD") else full)

    async with (
        raw_upstream(script) as up,
        client_for(up.port, timeout=0.5) as client,
    ):
        reply = await client.send("HEAD", "/x", HOST, None)
        assert reply.done
        assert reply.headers["Content-Length"] == "1234"
        assert await body_chunks(reply) == []
        reply.finish()
        # The next answer is parsed from its start, on a new connection: bytes of the body
        # that head announced could still come on the old one (see the next test).
        assert await fetch(client) == (200, b"ok")
    assert up.connections == 2


async def test_a_late_body_after_a_head_answer_is_never_the_next_answer() -> None:
    """An upstream that sends HEAD a body anyway, a moment later: on a reused connection it
    would be read as the answer to whoever's request came next."""
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nX-Smuggled: yes\r\n\r\nSMUGGLE"
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
    honest = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def script(peer: Peer) -> None:
        first = await peer.head()
        if first.startswith(b"HEAD"):
            await peer.send(head)
            await asyncio.sleep(0.1)
            await peer.send(smuggled)
            await peer.head()  # a request on this connection would get the smuggled answer
        await peer.send(honest)
        await peer.reader.read()

    async with raw_upstream(script) as up, client_for(up.port, timeout=0.5) as client:
        reply = await client.send("HEAD", "/x", HOST, None)
        reply.finish()
        await asyncio.sleep(0.2)  # the late bytes have come
        reply = await client.send("GET", "/x", HOST, None)
        assert "X-Smuggled" not in reply.headers
        assert await body_chunks(reply) == [b"ok"]
        reply.finish()


async def test_the_start_of_an_unasked_answer_after_an_answer_is_never_the_next_answer() -> None:
    """Bytes after a complete answer, in the same read, that begin another one (no parse error
    yet): the connection went back to the pool with that answer half-read, and the next
    request, whoever's it was, got it whole once the upstream sent the rest."""
    smuggled = b"X-Smuggled: yes\r\nContent-Length: 7\r\n\r\nSMUGGLE"
    honest = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def script(peer: Peer) -> None:
        first = await peer.head()
        if first.startswith(b"GET /first "):
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1 200 OK\r\n")
            await peer.head()  # a request on this connection would get the smuggled answer
            await peer.send(smuggled)
        await peer.send(honest)
        await peer.reader.read()

    async with raw_upstream(script) as up, client_for(up.port, timeout=0.5) as client:
        reply = await client.send("GET", "/first", HOST, None)
        assert await body_chunks(reply) == [b"abc"]
        reply.finish()
        reply = await client.send("GET", "/second", HOST, None)
        assert "X-Smuggled" not in reply.headers
        assert await body_chunks(reply) == [b"ok"]
        reply.finish()


@pytest.mark.parametrize("shape", ["many-lines", "one-endless-line"])
async def test_a_response_head_over_64_kib_is_bad_gateway(shape: str) -> None:
    async def script(peer: Peer) -> None:
        await peer.head()
        await peer.send(b"HTTP/1.1 200 OK\r\n")
        for _ in range(200):  # 200 KiB, in reads of 1 KiB
            line = b"X-Pad: " + b"a" * 1000 + b"\r\n" if shape == "many-lines" else b"a" * 1024
            await peer.send(line)
        await peer.reader.read()

    async with raw_upstream(script) as up, client_for(up.port) as client:
        with pytest.raises(MalformedResponse, match="larger than 64 KiB"):
            await client.send("GET", "/x", HOST, None)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 204 No Content\r\nX-Up: 1\r\n\r\n",
        b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 99\r\n\r\n',
    ],
)
async def test_204_and_304_have_no_body(answer: bytes) -> None:
    follow_up = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with (
        raw_upstream(keep_answering(answer, follow_up)) as up,
        client_for(up.port, timeout=0.5) as client,
    ):
        reply = await client.send("GET", "/x", HOST, None)
        assert reply.done
        assert await body_chunks(reply) == []
        reply.finish()
        assert await fetch(client) == (200, b"ok")
    assert up.connections == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=["connection-close", "http-1.0-without-keep-alive"],
)
async def test_an_answer_that_ends_the_connection_is_not_reused(answer: bytes) -> None:
    async with raw_upstream(keep_answering(answer, answer)) as up, client_for(up.port) as client:
        assert await fetch(client) == (200, b"ok")
        assert await fetch(client) == (200, b"ok")
    assert up.connections == 2


async def test_length_next_to_chunked_is_bad_gateway() -> None:
    # Both framings at once is how response splitting starts; nginx refuses it as well.
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
    async with raw_upstream(keep_answering(answer)) as up, client_for(up.port) as client:
        with pytest.raises(MalformedResponse, match="invalid HTTP response"):
            await client.send("GET", "/x", HOST, None)


# ------------------------------------------------------------------ interim answers


async def test_interim_answers_are_skipped() -> None:
    async def script(peer: Peer) -> None:
        await peer.head()
        await peer.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        await asyncio.sleep(0.05)
        await peer.send(
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone"
        )
        await peer.reader.read()

    async with raw_upstream(script) as up, client_for(up.port) as client:
        reply = await client.send("GET", "/x", HOST, None)
        assert reply.status == 201
        assert "Link" not in reply.headers
        assert await body_chunks(reply) == [b"done"]
        reply.finish()


async def test_an_interim_answer_saying_close_is_followed_by_the_final_one() -> None:
    """llhttp took the 103's `Connection: close` as the end of the connection and the 200
    after it for data after the close: a 502. The connection is not reused afterwards."""

    async def script(peer: Peer) -> None:
        await peer.head()
        await peer.send(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nConnection: close\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )
        await peer.reader.read()

    told: list[int] = []
    async with raw_upstream(script) as up, client_for(up.port) as client:
        for _ in range(2):
            reply = await client.send(
                "GET",
                "/x",
                HOST,
                None,
                on_interim=lambda status, reason, lines: told.append(status),
            )
            assert reply.status == 200
            assert await body_chunks(reply) == [b"ok"]
            reply.finish()
    assert told == [103, 103]
    assert up.connections == 2  # the upstream said it would close


async def test_switching_protocols_is_bad_gateway() -> None:
    answer = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    async with raw_upstream(keep_answering(answer)) as up, client_for(up.port) as client:
        with pytest.raises(MalformedResponse, match="switched protocols"):
            await client.send("GET", "/x", HOST, None)


# ---------------------------------------------------------------------- request side


def _reads_one_request(seen: list[bytes]) -> Script:
    """Records the whole request, head and body (by its length or its chunks), and answers."""

    async def script(peer: Peer) -> None:
        head = await peer.head()
        body = b""
        lower = head.lower()
        if b"content-length:" in lower:
            length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
            body = await peer.reader.readexactly(length)
        elif b"transfer-encoding: chunked" in lower:
            body = await peer.reader.readuntil(b"\r\n0\r\n\r\n")
        seen.append(head + body)
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await peer.reader.read()

    return script


async def _parts(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def test_body_without_length_is_sent_chunked() -> None:
    seen: list[bytes] = []
    async with raw_upstream(_reads_one_request(seen)) as up, client_for(up.port) as client:
        reply = await client.send("POST", "/up?a=1", HOST, _parts(b"hello", b"", b" world!"))
        assert reply.status == 200
        reply.finish()
    assert seen == [
        b"POST /up?a=1 HTTP/1.1\r\nHost: upstream\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n7\r\n world!\r\n0\r\n\r\n"
    ]


async def test_body_with_length_keeps_it() -> None:
    seen: list[bytes] = []
    headers = [*HOST, (b"Content-Length", b"11")]
    async with raw_upstream(_reads_one_request(seen)) as up, client_for(up.port) as client:
        reply = await client.send("PUT", "/up", headers, _parts(b"hello", b" world"))
        reply.finish()
    assert seen == [b"PUT /up HTTP/1.1\r\nHost: upstream\r\nContent-Length: 11\r\n\r\nhello world"]


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("POST", b"POST /x HTTP/1.1\r\nHost: upstream\r\nContent-Length: 0\r\n\r\n"),
        ("GET", b"GET /x HTTP/1.1\r\nHost: upstream\r\n\r\n"),
    ],
)
async def test_request_without_body(method: str, expected: bytes) -> None:
    seen: list[bytes] = []
    async with raw_upstream(_reads_one_request(seen)) as up, client_for(up.port) as client:
        (await client.send(method, "/x", HOST, None)).finish()
    assert seen == [expected]


async def test_early_answer_while_uploading_leaves_the_connection_unused() -> None:
    async def script(peer: Peer) -> None:
        await peer.head()
        await peer.send(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
        await peer.reader.read()

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * 65536
            await asyncio.sleep(0.01)

    async with raw_upstream(script) as up, client_for(up.port) as client:
        reply = await client.send("POST", "/up", HOST, endless())
        assert reply.status == 413
        assert await body_chunks(reply) == []
        reply.finish()  # the request was not sent whole: the connection cannot be reused
        await asyncio.wait_for(up.closed.wait(), 2)


# ------------------------------------------------------------------------ flow control


async def test_reading_pauses_while_the_reader_is_slow() -> None:
    written = [0]
    size = 64 * MB

    async def script(peer: Peer) -> None:
        await peer.head()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        chunk = b"z" * 65536
        while written[0] < size:
            await peer.send(chunk)
            written[0] += len(chunk)
        await peer.reader.read()  # the last chunks may still be buffered here

    async with raw_upstream(script) as up, client_for(up.port) as client:
        reply = await client.send("GET", "/big", HOST, None)
        await asyncio.sleep(0.5)
        # Held back by the client's bounded buffer and the sockets' own, not all sent.
        assert written[0] < 16 * MB
        received = 0
        while chunk := await reply.read():
            received += len(chunk)
        reply.finish()
    assert received == size
