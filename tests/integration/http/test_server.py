"""The proxy port's own HTTP/1.1 server (gateway.http.server) reading request heads, over
real loopback sockets: the head timeout, the 64 KiB bound, the heads it refuses with a 400 and
the client's request id on those answers, the bounds on chunk size lines and trailers, and the
hosts it serves.

Each test runs an `HttpServer` with a small handler of its own and sub-second timeouts, and
speaks raw HTTP to it (tests.support.raw_http): what is checked is the server's protocol
behaviour, not the gateway's request path. The server's other behaviour is in the
test_server_*.py files beside this one.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from gateway.http.parsing import HEAD_LIMIT
from tests.support.front import http_server
from tests.support.raw_http import (
    Recording,
    connected,
    echo,
    get,
    problem,
    read_reply,
    read_to_eof,
    reads_body,
)


async def test_trickling_head_gets_408_problem_and_close() -> None:
    served = http_server(echo, head_timeout=0.25)
    async with served as (_, port), connected(port) as (reader, writer):
        started = time.monotonic()
        writer.write(b"GET /slow HTTP/1.1\r\n")
        await asyncio.sleep(0.15)
        # More of the head, in time, does not restart the clock: the whole head is timed.
        writer.write(b"Host: t\r\n")
        reply = await read_reply(reader)
        assert time.monotonic() - started >= 0.2
        assert reply.status == 408
        assert reply.headers["connection"] == "close"
        assert problem(reply)["code"] == "request_timeout"
        assert await read_to_eof(reader) == b""


async def test_head_split_across_sends_in_time_is_answered() -> None:
    served = http_server(echo, head_timeout=0.5)
    async with served as (_, port), connected(port) as (reader, writer):
        writer.write(b"GET /split HTTP/1.1\r\nHo")
        await asyncio.sleep(0.05)
        writer.write(b"st: t\r\n\r\n")
        reply = await read_reply(reader)
        assert (reply.status, reply.body) == (200, b"GET /split ")


async def test_head_over_64_kib_gets_400_problem_and_close() -> None:
    recording = Recording()
    async with http_server(recording) as (_, port), connected(port) as (reader, writer):
        filler = "".join(f"X-Fill-{n}: {'a' * 1000}\r\n" for n in range(HEAD_LIMIT // 1000 + 2))
        writer.write(get("/big", extra=filler))
        reply = await read_reply(reader)
        assert reply.status == 400
        assert reply.headers["connection"] == "close"
        body = problem(reply)
        assert body["code"] == "bad_request"
        assert "64 KiB" in str(body["detail"])
        assert await read_to_eof(reader) == b""
        assert recording.paths == []  # the handler never saw it


async def test_head_over_64_kib_in_one_unfinished_header_line_gets_400() -> None:
    served = http_server(echo, head_timeout=0.5)
    async with served as (_, port), connected(port) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: ")
        await asyncio.sleep(0.02)  # later reads: the line goes on past the limit, unended
        writer.write(b"a" * (HEAD_LIMIT + 1024))
        reply = await read_reply(reader)
        assert reply.status == 400  # not a 408 once the head timeout is over


async def test_head_under_64_kib_of_lines_without_a_space_is_answered() -> None:
    """`a:b` is a whole header line (the space after the colon is optional): a head of such
    lines under the limit was counted a byte too large for each, and refused from 54 KB on."""
    lines = "a:b\r\n" * 12_000
    request = get("/short-lines", extra=lines)
    assert HEAD_LIMIT - 6 * 1024 < len(request) < HEAD_LIMIT
    async with http_server(echo) as (_, port), connected(port) as (reader, writer):
        writer.write(request)
        reply = await read_reply(reader)
        assert (reply.status, reply.body) == (200, b"GET /short-lines ")


async def test_whitespace_after_a_value_counts_towards_the_64_kib() -> None:
    """Dropped from the value before it was counted, whitespace after it let a head of
    150 KB through as one of a few hundred bytes."""
    recording = Recording()
    async with http_server(recording) as (_, port), connected(port) as (reader, writer):
        writer.write(get("/padded", extra="X-Pad: b" + " " * (HEAD_LIMIT + 1024) + "\r\n"))
        reply = await read_reply(reader)
        assert reply.status == 400
        assert "64 KiB" in str(problem(reply)["detail"])
        assert recording.paths == []


async def test_malformed_request_line_gets_400_problem_and_close() -> None:
    async with http_server(echo) as (_, port), connected(port) as (reader, writer):
        writer.write(b"GET /a b c\r\nHost: t\r\n\r\n")
        reply = await read_reply(reader)
        assert reply.status == 400
        assert reply.headers["connection"] == "close"
        assert problem(reply)["code"] == "bad_request"
        assert await read_to_eof(reader) == b""


@pytest.mark.parametrize(
    ("head", "detail"),
    [
        (b"GET /a HTTP/1.1\r\n\r\n", "exactly one Host header"),
        (b"GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "exactly one Host header"),
        (b"GET /a HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", "exactly one Host header"),
        (b'GET /a HTTP/1.1\r\nHost: evil.com/a?b#c@d"<x>\r\n\r\n', "Host header is not a host"),
        (
            b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            "Transfer-Encoding other than chunked",
        ),
        (
            b"POST /a HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "HTTP/1.0 request may not have a Transfer-Encoding",
        ),
        (b"GET /a?api_key=k\r\n\r\n", "HTTP/0.9 is not spoken here"),
        (b"GET /a HTTP/2.0\r\nHost: a\r\n\r\n", "HTTP/2.0 is not spoken here"),
        (b"GET /old# HTTP/1.1\r\nHost: a\r\n\r\n", "its target holds a '#'"),
        (b"GET /a?b=c#d HTTP/1.1\r\nHost: a\r\n\r\n", "its target holds a '#'"),
        (b"GET http://a/old#x HTTP/1.1\r\nHost: a\r\n\r\n", "its target holds a '#'"),
        # Hosts an upstream could split or read otherwise (an audit found them all served)
        (b"GET /a HTTP/1.1\r\nHost: x:abc\r\n\r\n", "Host header is not a host"),
        (b"GET /a HTTP/1.1\r\nHost: a:1:2\r\n\r\n", "Host header is not a host"),
        (b"GET /a HTTP/1.1\r\nHost: [::1\r\n\r\n", "Host header is not a host"),
        (b"GET /a HTTP/1.1\r\nHost: a.example:99999\r\n\r\n", "Host header is not a host"),
        (b"GET /a HTTP/1.1\r\nHost: a.example,b.example\r\n\r\n", "Host header is not a host"),
        (b"GET /a HTTP/1.1\r\nHost: a.example;b\r\n\r\n", "Host header is not a host"),
        (b"GET /a HTTP/1.1\r\nHost: :80\r\n\r\n", "Host header is not a host"),
        (b"GET http://:80/a HTTP/1.1\r\nHost: a\r\n\r\n", "target's host is not a host"),
        # Targets that are neither a path nor an http(s) URL, and CONNECT in any form
        (b"GET ftp://a.example/a HTTP/1.1\r\nHost: a\r\n\r\n", "neither a path nor"),
        (b"GET http:///a HTTP/1.1\r\nHost: a\r\n\r\n", "target's host is not a host"),
        (b"GET http://a,b/a HTTP/1.1\r\nHost: a\r\n\r\n", "target's host is not a host"),
        (b"GET http://u@a/a HTTP/1.1\r\nHost: a\r\n\r\n", "target's host is not a host"),
        (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", "only OPTIONS may have the target"),
        (b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n", "CONNECT is not"),
        (b"CONNECT /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc", "CONNECT is not"),
    ],
    ids=[
        "no-host",
        "two-hosts",
        "two-hosts-1.0",
        "not-a-host",
        "gzip-coding",
        "chunked-on-1.0",
        "0.9",
        "2.0",
        "fragment-in-path",
        "fragment-in-query",
        "fragment-absolute",
        "host-port-not-digits",
        "host-two-ports",
        "host-unclosed-ipv6",
        "host-port-too-large",
        "host-comma-list",
        "host-semicolon",
        "host-port-alone",
        "target-port-alone",
        "target-ftp",
        "target-no-host",
        "target-comma-host",
        "target-userinfo",
        "target-asterisk-not-options",
        "connect-authority",
        "connect-path",
    ],
)
async def test_a_head_the_upstream_could_read_otherwise_is_400(head: bytes, detail: str) -> None:
    """RFC 9112: one Host, and only the chunked coding (another would reach the upstream
    de-chunked but still coded, with nothing to say so); no fragment in the target (RFC 9112
    3.2), which the routes would read as part of the path where an upstream drops it: `/old#`
    would pass a retired `/old` as a `/{rest:path}` route."""
    async with http_server(echo) as (_, port), connected(port) as (reader, writer):
        writer.write(head)
        reply = await read_reply(reader)
        assert reply.status == 400
        assert detail in problem(reply)["detail"]
        assert await read_to_eof(reader) == b""


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"POST /a HTTP/1.1\r\nHost: t\r\nX-Request-ID: mine-1\r\nHost: u\r\n\r\n", 400),
        (
            b"POST /a HTTP/1.1\r\nHost: t\r\nX-Request-ID: mine-1\r\n"
            b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        # stalls (a header line is read once the next one begins: obs-fold is refused)
        (b"GET /a HTTP/1.1\r\nHost: t\r\nX-Request-ID: mine-1\r\nAccept: */*\r\n", 408),
    ],
    ids=["two-hosts", "length-and-chunked", "slow-head"],
)
async def test_a_refused_head_is_answered_with_the_clients_request_id(
    head: bytes, status: int
) -> None:
    """Every answer carries the client's X-Request-ID when it sent a sane one (an audit found
    the server's own 400s and 408s with a new one), and the access log records it."""
    async with (
        http_server(echo, head_timeout=0.3) as (_, port),
        connected(port) as (reader, writer),
    ):
        writer.write(head)
        reply = await read_reply(reader)
        assert reply.status == status
        assert reply.headers["x-request-id"] == "mine-1"
        assert problem(reply)["request_id"] == "mine-1"


async def test_a_trailer_section_over_64_kib_sent_at_once_gets_400() -> None:
    """The read that holds the last chunk's header was not counted: 100 KB of trailer fields
    written with it got through."""

    async with http_server(reads_body) as (_, port), connected(port) as (reader, writer):
        fields = b"".join(b"X-T%d: %b\r\n" % (i, b"a" * 1000) for i in range(100))
        writer.write(
            b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n" + fields + b"\r\n"
        )
        reply = await read_reply(reader)
        assert reply.status == 400
        assert "trailer section is over 65536 bytes" in str(problem(reply)["detail"])


async def test_a_chunk_size_line_over_64_kib_is_400_and_chunks_of_any_size_are_read() -> None:
    """httptools reads chunk extensions without a callback: an endless one was read for as
    long as the client kept sending, never counted against anything."""

    async with http_server(reads_body) as (_, port), connected(port) as (reader, writer):
        chunk = b"x" * 70_000
        writer.write(
            b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(b"%x;ext=1\r\n%b\r\n" % (len(chunk), chunk) for _ in range(20))
            + b"0\r\n\r\n"
        )
        assert (await read_reply(reader)).body == b"read"  # 1.4 MB of chunks: no size line
        writer.write(
            b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n1;name="
        )
        for _ in range(10):  # 9 are over the bound; the 10th, if a read held two of them
            await asyncio.sleep(0.01)  # reads of their own, as a trickling client sends
            writer.write(b"a" * 8192)
        reply = await read_reply(reader)
        assert reply.status == 400
        assert "a chunk's size line is over 65536 bytes" in str(problem(reply)["detail"])


@pytest.mark.parametrize(
    ("endless", "refusal"),
    [
        (b"1;name=", "a chunk's size line is over 65536 bytes"),
        (b"1\r\nx\r\n0\r\nX-Endless: ", "trailer section is over 65536 bytes"),
    ],
    ids=["size-line", "trailer"],
)
async def test_a_chunked_body_behind_an_upgrade_request_is_bounded_too(
    endless: bytes, refusal: str
) -> None:
    """An upgrade request's body is read by a parser of its own, which passed on no chunk
    events: its size lines and trailer were read for as long as the client kept sending, and
    an Upgrade line was all it took to get past either bound."""
    head = (
        b"POST /up HTTP/1.1\r\nHost: t\r\nUpgrade: x\r\nConnection: Upgrade\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    async with http_server(reads_body) as (_, port), connected(port) as (reader, writer):
        writer.write(head + b"3;a=b\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n")  # within bounds
        assert (await read_reply(reader)).body == b"read"
    async with http_server(reads_body) as (_, port), connected(port) as (reader, writer):
        writer.write(head + b"3\r\nabc\r\n" + endless)
        for _ in range(10):
            await asyncio.sleep(0.01)  # reads of their own, as a trickling client sends
            writer.write(b"a" * 8192)
        reply = await read_reply(reader)
        assert reply.status == 400
        assert refusal in str(problem(reply)["detail"])


async def test_hosts_that_are_hosts_and_http_1_0_without_one_are_served() -> None:
    for host in (
        b"Host: example.com:8080\r\n",
        b"Host: [::1]:80\r\n",
        b"Host: 10.0.0.1\r\n",
        b"Host: [fe80::1%25eth0]\r\n",
        b"Host: a.example:\r\n",  # an empty port (RFC 3986 3.2.3)
        b"Host: \r\n",  # a target without an authority (RFC 9112 3.2)
        b"Host: my_host.internal:65535\r\n",
    ):
        async with http_server(echo) as (_, port), connected(port) as (reader, writer):
            writer.write(b"GET /a HTTP/1.1\r\n" + host + b"\r\n")
            assert (await read_reply(reader)).status == 200
    async with http_server(echo) as (_, port), connected(port) as (reader, writer):
        writer.write(b"GET /a HTTP/1.0\r\n\r\n")
        assert (await read_reply(reader)).status == 200


async def test_400_after_a_trickled_head_is_timed_from_its_own_head(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with http_server(echo) as (_, port), connected(port) as (reader, writer):
        writer.write(b"GET /one HTTP/1.1\r\nHost:")
        await asyncio.sleep(0.05)  # a head in two reads: its clock starts
        writer.write(b" t\r\n\r\n")
        assert (await read_reply(reader)).status == 200
        await asyncio.sleep(0.3)
        sent = time.monotonic()
        writer.write(b"GET /a b c\r\nHost: t\r\n\r\n")  # malformed, in one read
        assert (await read_reply(reader)).status == 400
        answered = time.monotonic()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    (logged,) = [line for line in lines if line["status"] == 400]
    # Not since the first request's head began (0.35 s before `sent`): within the time this
    # head took to be sent and answered, however slow a busy machine made that.
    assert logged["duration_ms"] <= (answered - sent) * 1000 + 1
