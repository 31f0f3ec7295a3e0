"""The proxy port's own HTTP/1.1 server (gateway.http.server), over real loopback sockets.

Each test runs an `HttpServer` with a small handler of its own and sub-second timeouts, and
speaks raw HTTP to it: what is checked is the server's protocol behaviour (framing,
keep-alive, timeouts, cancellation, shutdown), not the gateway's request path. The last tests
go through a whole gateway Worker for the two things only its pipeline decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.http.errors import HttpError
from gateway.http.parsing import HEAD_LIMIT
from gateway.http.request import Request
from gateway.problems import Unauthorized
from tests.support.config import worker_server_yaml, write_config
from tests.support.front import answer_problem, as_problem, http_server
from tests.support.gateway import running_gateway

TEXT = b"Content-Type: text/plain\r\n"


@asynccontextmanager
async def connected(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A raw client connection, closed however the test ends (uvloop cannot close a loop
    holding an open transport)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@dataclass
class Reply:
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names; the gateway's own answers repeat none
    body: bytes
    raw_body: bytes  # as framed on the wire (chunk sizes included)


async def read_reply(reader: asyncio.StreamReader, *, head_only: bool = False) -> Reply:
    """One answer, framed as a client must: Content-Length, chunked, or up to the close."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
    _, status, reason = status_line.split(" ", 2)
    headers = {n.strip().lower(): v.strip() for n, _, v in (x.partition(":") for x in lines)}
    body = raw = b""
    if head_only:
        return Reply(int(status), reason, headers, body, raw)
    if headers.get("transfer-encoding") == "chunked":
        while True:
            size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), 2)
            size = int(size_line.strip(), 16)
            data = await asyncio.wait_for(reader.readexactly(size + 2), 2)
            raw += size_line + data
            body += data[:-2]
            if size == 0:
                break
    elif "content-length" in headers:
        body = raw = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 2)
    else:
        body = raw = await read_to_eof(reader)
    return Reply(int(status), reason, headers, body, raw)


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes; a server that never closes fails the test."""
    return await asyncio.wait_for(reader.read(-1), 2)


def get(path: str = "/", *, version: str = "1.1", extra: str = "") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: t\r\n{extra}\r\n".encode()


async def echo(request: Request) -> None:
    """Answers `METHOD path body` after reading the whole body, so keep-alive can go on."""
    body = b""
    while chunk := await request.content.read():
        body += chunk
    text = f"{request.method} {request.raw_path} ".encode() + body
    request.connection.respond(request, 200, "OK", TEXT, text)


class Recording:
    """`echo`, remembering which requests reached it."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, request: Request) -> None:
        self.paths.append(request.raw_path)
        await echo(request)


def problem(reply: Reply) -> dict[str, object]:
    assert reply.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = json.loads(reply.body)
    assert body["status"] == reply.status
    return body


# --- keep-alive ----------------------------------------------------------------------------


async def test_keep_alive_answers_two_requests_on_one_connection() -> None:
    async with http_server(echo) as (_, port), connected(port) as (reader, writer):
        for path in ("/one", "/two"):
            writer.write(get(path))
            reply = await read_reply(reader)
            assert (reply.status, reply.body) == (200, f"GET {path} ".encode())
            assert "connection" not in reply.headers  # HTTP/1.1 keeps alive by default


async def test_http10_without_keep_alive_is_told_close_and_closed() -> None:
    async with http_server(echo) as (_, port), connected(port) as (reader, writer):
        writer.write(get("/old", version="1.0"))
        reply = await read_reply(reader)
        assert reply.status == 200
        assert reply.headers["connection"] == "close"
        assert await read_to_eof(reader) == b""


async def test_http10_asking_keep_alive_stays_open_and_says_so() -> None:
    async with http_server(echo) as (_, port), connected(port) as (reader, writer):
        for path in ("/a", "/b"):  # the second answer proves the connection stayed open
            writer.write(get(path, version="1.0", extra="Connection: keep-alive\r\n"))
            reply = await read_reply(reader)
            assert reply.body == f"GET {path} ".encode()
            # An HTTP/1.0 client closes unless told otherwise.
            assert reply.headers["connection"] == "keep-alive"


async def test_pipelined_requests_are_answered_in_order() -> None:
    async def slow_first(request: Request) -> None:
        if request.raw_path == "/1":
            await asyncio.sleep(0.1)  # were the others run alongside, they would overtake it
        request.connection.respond(request, 200, "OK", TEXT, request.raw_path.encode())

    async with http_server(slow_first) as (_, port), connected(port) as (reader, writer):
        writer.write(get("/1") + get("/2") + get("/3"))
        bodies = [(await read_reply(reader)).body for _ in range(3)]
        assert bodies == [b"/1", b"/2", b"/3"]


@pytest.mark.parametrize(
    "bad",
    [
        b"GET /x HTTP/9.9\r\nHost: t\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET /x HTTP/1.1\r\nNoColon\r\n\r\n",
    ],
    ids=["version", "garbage", "header"],
)
async def test_a_bad_head_pipelined_behind_good_ones_gets_its_400_in_turn(bad: bytes) -> None:
    """The requests before it are answered as if nothing had happened (keep-alive: more
    answers follow), then its 400, then the close; it was dropped without a word."""
    async with http_server(echo) as (_, port), connected(port) as (reader, writer):
        writer.write(get("/1") + get("/2") + bad)
        for path in ("/1", "/2"):
            reply = await read_reply(reader)
            assert (reply.status, reply.body) == (200, f"GET {path} ".encode())
            assert "connection" not in reply.headers
        reply = await read_reply(reader)
        assert reply.status == 400 and problem(reply)["code"] == "bad_request"
        assert reply.headers["connection"] == "close"
        assert await read_to_eof(reader) == b""


@pytest.mark.parametrize("chunked_answer", [True, False])
async def test_a_head_read_while_an_answer_streams_leaves_its_framing_alone(
    chunked_answer: bool,
) -> None:
    """The parser's note that a request head says `Transfer-Encoding: chunked` and the answer's
    own chunked framing were one attribute: a pipelined head read while an answer streamed
    switched that answer's framing half-way (its next pieces framed or not framed anew)."""

    async def streamed(request: Request) -> None:
        connection = request.connection
        if request.raw_path == "/2":
            connection.respond(request, 200, "OK", TEXT, b"second")
            return
        length = b"" if chunked_answer else b"Content-Length: 6\r\n"
        connection.begin_answer(request, 200, "OK", TEXT + length, chunked=chunked_answer)
        await connection.write_body(b"abc")
        await asyncio.sleep(0.2)  # the next head arrives meanwhile
        await connection.write_body(b"def")
        connection.end_answer()

    second = (
        b"POST /2 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        if not chunked_answer
        else get("/2")
    )
    async with http_server(streamed) as (_, port), connected(port) as (reader, writer):
        writer.write(get("/1"))
        await asyncio.sleep(0.1)
        writer.write(second)
        first = await read_reply(reader)
        assert (first.status, first.body) == (200, b"abcdef")
        assert (await read_reply(reader)).body == b"second"


async def pipeline_unread(writer: asyncio.StreamWriter, seconds: float) -> int:
    """Pipeline requests for `seconds`, reading none of the answers; the bytes sent."""
    batch = get() * 200
    sent = 0
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(seconds):
            while True:
                writer.write(batch)
                await writer.drain()  # returns only while the server reads on
                sent += len(batch)
    return sent


async def test_pipelined_answers_the_client_does_not_read_are_not_queued_without_bound() -> None:
    """Answers written whole (the gateway's own: 401, 404, ...) wait for the client to take
    the ones before: the server stops reading its requests meanwhile. It read on and queued
    every answer in memory, megabytes a second from one connection."""
    answer = b"x" * 4096

    async def own_answer(request: Request) -> None:
        request.connection.respond(request, 200, "OK", TEXT, answer)

    async with http_server(own_answer) as (server, port), connected(port) as (_, writer):
        await pipeline_unread(writer, 1.0)
        (connection,) = server.connections
        assert connection.transport is not None
        # The transport's high-water mark (64 KiB) and an answer or so above it, not MBs.
        assert connection.transport.get_write_buffer_size() < 256 * 1024
        writer.transport.abort()  # its unsent requests would hold the close


async def test_a_client_that_reads_none_of_its_pipelined_answers_is_cut_after_send_timeout() -> (
    None
):
    async def own_answer(request: Request) -> None:
        request.connection.respond(request, 200, "OK", TEXT, b"x" * 4096)

    served = http_server(own_answer, send_timeout=0.3)
    async with served as (server, port), connected(port) as (_, writer):
        await pipeline_unread(writer, 0.2)
        started = time.monotonic()
        while server.connections and time.monotonic() - started < 3:
            await asyncio.sleep(0.05)
        assert not server.connections
        writer.transport.abort()


async def test_a_slow_reader_of_pipelined_answers_gets_them_all() -> None:
    """Reading all along, however slowly, is not taking nothing: the cut is for a client that
    stopped reading, not for one whose answers take longer than `send_timeout` to leave."""

    async def own_answer(request: Request) -> None:
        request.connection.respond(request, 200, "OK", TEXT, b"x" * 4096)

    # Not shorter: the reader shares the server's event loop, and a stall of the whole test
    # process (a busy machine) longer than this would look like a client that stopped.
    served = http_server(own_answer, send_timeout=0.5)
    async with served as (_, port), connected(port) as (reader, writer):
        count = 3000  # 12 MB of answers, more than the socket buffers hold
        writer.write(get() * count)
        started = time.monotonic()
        for n in range(count):
            assert (await read_reply(reader)).status == 200
            if n % 100 == 0:
                await asyncio.sleep(0.03)
        assert time.monotonic() - started > 0.5  # longer than send_timeout, all the same


async def test_idle_connection_is_closed_after_keepalive_timeout() -> None:
    served = http_server(echo, keepalive_timeout=0.2)
    async with served as (_, port), connected(port) as (reader, writer):
        writer.write(get())
        await read_reply(reader)
        started = time.monotonic()
        assert await read_to_eof(reader) == b""
        # Swept every keepalive/4: closed soon after the timeout, not before it.
        assert 0.15 <= time.monotonic() - started < 1.0


async def test_connection_with_a_slow_handler_outlives_keepalive_timeout() -> None:
    async def slow(request: Request) -> None:
        await asyncio.sleep(0.4)  # twice the keep-alive timeout, while the client waits
        request.connection.respond(request, 200, "OK", TEXT, b"late")

    served = http_server(slow, keepalive_timeout=0.2)
    async with served as (_, port), connected(port) as (reader, writer):
        writer.write(get())
        assert (await read_reply(reader)).body == b"late"


async def test_connection_in_steady_use_outlives_keepalive_timeout() -> None:
    served = http_server(echo, keepalive_timeout=0.5)
    async with served as (_, port), connected(port) as (reader, writer):
        # A request every 0.1 s for 0.8 s: each answer restarts the idle clock. (A pause of
        # 0.4 s more than planned, a busy machine's late wake-up, still stays inside it.)
        for _ in range(9):
            writer.write(get())
            assert (await read_reply(reader)).status == 200
            await asyncio.sleep(0.1)


# --- request heads -------------------------------------------------------------------------


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


async def reads_body(request: Request) -> None:
    """Reads the whole body, then answers 200 "read"; a failure is answered as the gateway
    answers it."""
    try:
        while await request.content.read():
            pass
    except HttpError as error:
        answer_problem(request, as_problem(error), "rid")
        return
    request.connection.respond(request, 200, "OK", TEXT, b"read")


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


# --- request bodies ------------------------------------------------------------------------

EXPECTING_5_BYTES = (
    b"POST /up HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
)


async def test_100_continue_is_sent_only_once_the_handler_reads_the_body() -> None:
    async with http_server(echo) as (_, port), connected(port) as (reader, writer):
        writer.write(EXPECTING_5_BYTES)
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        reply = await read_reply(reader)
        assert (reply.status, reply.body) == (200, b"POST /up hello")
        assert "connection" not in reply.headers  # the body was read: the connection goes on


async def test_an_http10_expect_is_ignored() -> None:
    """RFC 9110 10.1.1: an HTTP/1.0 client knows no 100 Continue; it sends its body anyway."""
    async with http_server(echo) as (_, port), connected(port) as (reader, writer):
        writer.write(EXPECTING_5_BYTES.replace(b"HTTP/1.1", b"HTTP/1.0"))
        await asyncio.sleep(0.1)  # what a 1.0 client with an Expect does: waits a little
        writer.write(b"hello")
        first = await asyncio.wait_for(reader.readuntil(b"\r\n"), 2)
        assert first == b"HTTP/1.1 200 OK\r\n"  # the final answer, no interim one


async def test_100_continue_is_not_sent_when_the_handler_answers_without_the_body() -> None:
    async def refuse(request: Request) -> None:
        answer_problem(request, Unauthorized("no key"), "rid")

    async with http_server(refuse) as (_, port), connected(port) as (reader, writer):
        writer.write(EXPECTING_5_BYTES)
        reply = await read_reply(reader)  # the first thing on the wire is the final answer
        assert reply.status == 401
        # The unsent body would be read as the next request: only closing is safe.
        assert reply.headers["connection"] == "close"
        assert await read_to_eof(reader) == b""


@pytest.mark.parametrize(
    ("framing", "pieces"),
    [
        ("Content-Length: 11", [b"hel", b"lo w", b"orld"]),
        # Splits inside a chunk's size line and inside its data, and a separate terminator.
        ("Transfer-Encoding: chunked", [b"5\r\nhe", b"llo\r\n6", b"\r\n world\r\n", b"0\r\n\r\n"]),
    ],
    ids=["content-length", "chunked"],
)
async def test_body_sent_in_pieces_reaches_the_handler_whole(
    framing: str, pieces: list[bytes]
) -> None:
    async with http_server(echo) as (_, port), connected(port) as (reader, writer):
        writer.write(f"POST /up HTTP/1.1\r\nHost: t\r\n{framing}\r\n\r\n".encode())
        for piece in pieces:
            await asyncio.sleep(0.02)  # separate reads on the server's side
            writer.write(piece)
        reply = await read_reply(reader)
        assert reply.body == b"POST /up hello world"
        writer.write(get("/after"))  # the body's end was found exactly: the next request parses
        assert (await read_reply(reader)).body == b"GET /after "


async def test_a_trailer_section_over_64_kib_is_400() -> None:
    """The trailer is bounded as the head is: its lines are only reported once whole, so an
    endless one was read for as long as client_body let it, then called a stall (408)."""

    async with http_server(reads_body) as (_, port), connected(port) as (reader, writer):
        writer.write(
            b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"  # a trailer within bounds: read
        )
        assert (await read_reply(reader)).body == b"read"
        writer.write(
            b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Endless: "
        )
        for _ in range(10):
            await asyncio.sleep(0.01)  # reads of their own, as a trickling client sends
            writer.write(b"a" * 8192)
        reply = await read_reply(reader)
        assert reply.status == 400
        assert "trailer section is over 65536 bytes" in str(problem(reply)["detail"])


async def test_connection_goes_on_after_a_large_body_the_handler_left_unread() -> None:
    """A body over the high-water mark pauses reading; once it is complete nothing more
    of it can come, so an answer that leaves it unread must not leave reading paused."""

    async def ignore_body(request: Request) -> None:
        while not request.content.done:  # answered once the whole body is in, unread
            await asyncio.sleep(0.005)
        request.connection.respond(request, 200, "OK", TEXT, b"ignored")

    size = 256 * 1024 + 1  # the read that crosses the high-water mark also ends the body
    async with http_server(ignore_body) as (_, port), connected(port) as (reader, writer):
        writer.write(f"POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n".encode())
        writer.write(b"x" * size)
        reply = await read_reply(reader)
        assert (reply.status, reply.body) == (200, b"ignored")
        assert "connection" not in reply.headers  # the body was complete: keep-alive
        writer.write(get("/after"))
        assert (await read_reply(reader)).body == b"ignored"


# --- answers -------------------------------------------------------------------------------


async def test_head_request_gets_content_length_but_no_body() -> None:
    async with http_server(echo) as (_, port), connected(port) as (reader, writer):
        writer.write(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n" + get("/next"))
        reply = await read_reply(reader, head_only=True)
        assert reply.headers["content-length"] == str(len(b"HEAD /h "))
        # Were any body bytes sent, they would stand where the next status line must be.
        following = await read_reply(reader)
        assert (following.status, following.body) == (200, b"GET /next ")


class Parked:
    """A handler that never answers by itself, and tells when it was cancelled."""

    def __init__(self) -> None:
        self.started, self.cancelled = asyncio.Event(), asyncio.Event()

    async def __call__(self, request: Request) -> None:
        self.started.set()
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


async def test_client_going_away_cancels_the_handler() -> None:
    parked = Parked()
    async with http_server(parked) as (_, port):
        async with connected(port) as (_, writer):
            writer.write(get())
            await asyncio.wait_for(parked.started.wait(), 2)
        # Closed with the handler still waiting: the task must not run on for nobody.
        await asyncio.wait_for(parked.cancelled.wait(), 1)


async def streamed(request: Request) -> None:
    """An answer whose length is unknown when it begins, as a streamed upstream body's is."""
    connection = request.connection
    connection.begin_answer(request, 200, "OK", TEXT, chunked=True)
    for part in (b"one,", b"two,"):
        await connection.write_body(part)
        await asyncio.sleep(0.01)  # separate writes, as a body trickling from upstream
    connection.end_answer(b"three")


async def test_chunked_answer_to_http11_client_is_validly_chunked() -> None:
    async with http_server(streamed) as (_, port), connected(port) as (reader, writer):
        writer.write(get())
        reply = await read_reply(reader)
        assert reply.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in reply.headers
        assert reply.raw_body == b"4\r\none,\r\n4\r\ntwo,\r\n5\r\nthree\r\n0\r\n\r\n"
        writer.write(get())  # chunked framing keeps the connection usable
        assert (await read_reply(reader)).body == b"one,two,three"


async def test_chunked_answer_to_http10_client_is_close_delimited() -> None:
    async with http_server(streamed) as (_, port), connected(port) as (reader, writer):
        # An HTTP/1.0 client cannot read chunks, even when it asks to keep the connection.
        writer.write(get(version="1.0", extra="Connection: keep-alive\r\n"))
        reply = await read_reply(reader)  # no length, no chunks: read to the close
        assert "transfer-encoding" not in reply.headers
        assert reply.headers["connection"] == "close"
        assert reply.body == b"one,two,three"


async def test_upgrade_request_gets_an_ordinary_answer_then_close() -> None:
    recording = Recording()
    async with http_server(recording) as (_, port), connected(port) as (reader, writer):
        upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        # Bytes of the other protocol after the head must not be parsed as HTTP.
        writer.write(get("/ws", extra=upgrade) + b"\x81\x05hello" + get("/smuggled"))
        reply = await read_reply(reader)
        assert (reply.status, reply.body) == (200, b"GET /ws ")
        assert reply.headers["connection"] == "close"
        assert await read_to_eof(reader) == b""
        assert recording.paths == ["/ws"]


# --- shutdown ------------------------------------------------------------------------------


async def test_shutdown_closes_an_idle_connection_at_once() -> None:
    async with http_server(echo) as (server, port), connected(port) as (reader, writer):
        writer.write(get())
        await read_reply(reader)
        started = time.monotonic()
        await server.shutdown(2.0)
        assert time.monotonic() - started < 1.5  # nothing to wait for: not the grace period
        assert await read_to_eof(reader) == b""


async def test_shutdown_lets_a_request_in_flight_finish_with_connection_close() -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def waits(request: Request) -> None:
        started.set()
        await release.wait()
        request.connection.respond(request, 200, "OK", TEXT, b"finished")

    async with http_server(waits) as (server, port), connected(port) as (reader, writer):
        writer.write(get())
        await asyncio.wait_for(started.wait(), 2)
        shutdown = asyncio.create_task(server.shutdown(2.0))
        await asyncio.sleep(0.05)
        assert not shutdown.done()  # it waits for the answer
        release.set()
        reply = await read_reply(reader)
        assert (reply.status, reply.body) == (200, b"finished")
        assert reply.headers["connection"] == "close"
        assert await read_to_eof(reader) == b""
        await asyncio.wait_for(shutdown, 1)  # done once the last connection went


async def test_shutdown_answers_the_pipelined_requests_already_read() -> None:
    """Read before the shutdown began, they are in flight as much as the first: each is
    answered, the last one says close (they were dropped unanswered)."""
    started, release = asyncio.Event(), asyncio.Event()

    async def first_waits(request: Request) -> None:
        if request.raw_path == "/1":
            started.set()
            await release.wait()
        request.connection.respond(request, 200, "OK", TEXT, request.raw_path.encode())

    async with http_server(first_waits) as (server, port), connected(port) as (reader, writer):
        writer.write(get("/1") + get("/2") + get("/3"))
        await asyncio.wait_for(started.wait(), 2)
        await asyncio.sleep(0.05)  # for the other two heads to be read
        shutdown = asyncio.create_task(server.shutdown(2.0))
        await asyncio.sleep(0.05)
        release.set()
        replies = [await read_reply(reader) for _ in range(3)]
        assert [reply.body for reply in replies] == [b"/1", b"/2", b"/3"]
        assert [reply.headers.get("connection") for reply in replies] == [None, None, "close"]
        assert await read_to_eof(reader) == b""
        await asyncio.wait_for(shutdown, 1)


async def test_shutdown_cuts_a_request_that_outlasts_the_grace() -> None:
    parked = Parked()
    async with http_server(parked) as (server, port), connected(port) as (reader, writer):
        writer.write(get())
        await asyncio.wait_for(parked.started.wait(), 2)
        began = time.monotonic()
        await server.shutdown(0.15)
        assert 0.1 <= time.monotonic() - began < 1.0
        await asyncio.wait_for(parked.cancelled.wait(), 1)
        # No answer at all: the client sees the cut rather than a complete-looking answer.
        with contextlib.suppress(ConnectionResetError):  # an abort may arrive as a reset
            assert await read_to_eof(reader) == b""


async def test_shutdown_returns_only_after_cut_handlers_have_finished() -> None:
    parked = Parked()
    async with http_server(parked) as (server, port), connected(port) as (_, writer):
        writer.write(get())
        await asyncio.wait_for(parked.started.wait(), 2)
        await server.shutdown(0.05)
        # What shutdown() promises ("the cancelled handlers record their 499s before the
        # process goes"): the worker closes the upstream pools right after it returns.
        assert parked.cancelled.is_set()


# --- through the whole gateway -------------------------------------------------------------

API = """
products:
  soccer:
    upstream: {url: "http://127.0.0.1:9/base"}
    routes:
      - path: /soccer/v5/{rest:path}
      - path: /soccer/latest/{rest:path}
        redirect: {to: "/soccer/v4/{rest}", permanent: false}
      - path: /soccer/old/{rest:path}
        redirect: {to: "/soccer/v4/{rest}", permanent: true}
plans: {open: {}}
keys: [{name: tester, key: secret-1, plans: {soccer: open}}]
"""


@pytest.fixture
async def gateway_port(tmp_path: Path) -> AsyncIterator[int]:
    async with running_gateway(
        write_config(tmp_path / "config", API, server=worker_server_yaml())
    ) as worker:
        yield worker.proxy_port


async def test_gateway_head_without_key_gets_401_headers_without_body(gateway_port: int) -> None:
    async with connected(gateway_port) as (reader, writer):
        writer.write(b"HEAD /soccer/v5/x HTTP/1.1\r\nHost: t\r\n\r\n" + get("/soccer/v5/x"))
        head = await read_reply(reader, head_only=True)
        assert (head.status, head.reason) == (401, "Unauthorized")
        assert head.headers["content-type"] == "application/problem+json"
        # The GET's answer follows the HEAD's head at once: no body bytes came in between.
        following = await read_reply(reader)
        assert problem(following)["code"] == "unauthorized"
        # The HEAD's length is the one a GET's body has.
        assert int(head.headers["content-length"]) == len(following.body)


@pytest.mark.parametrize(
    ("prefix", "status", "reason"), [("latest", 302, "Found"), ("old", 301, "Moved Permanently")]
)
async def test_gateway_redirect_has_the_standard_reason_phrase(
    gateway_port: int, prefix: str, status: int, reason: str
) -> None:
    async with connected(gateway_port) as (reader, writer):
        writer.write(get(f"/soccer/{prefix}/en/x.json?limit=3"))
        reply = await read_reply(reader)
        assert (reply.status, reply.reason) == (status, reason)
        assert reply.headers["location"] == "/soccer/v4/en/x.json?limit=3"
