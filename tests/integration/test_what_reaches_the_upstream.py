"""What a client can get through the gateway to the upstream, byte for byte: a real gateway in
front of an upstream that records every byte it receives (an audit of request smuggling, the
key's removal and routing). A paid API's gateway must never let a request reach the upstream
that it did not itself check and meter, nor pass the caller's key on."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.config import worker_server_yaml, write_config
from tests.support.gateway import running_gateway
from tests.support.recording_upstream import Recording, recording_upstream

API = """
products:
  api:
    upstream: {{url: "http://127.0.0.1:{port}/base"}}
    routes:
      - path: /free/{{rest:path}}
      - path: /paid/{{rest:path}}
        cost: 100
      - path: /docs/{{id}}
        methods: [GET, POST]
  told:
    upstream: {{url: "http://127.0.0.1:{port}/base", identity_headers: true}}
    routes:
      - path: /told/{{rest:path}}
plans:
  metered:
    quota: {{limit: 100000, per: month}}
keys:
  - {{name: client, key: secret-one, plans: {{api: metered, told: metered}}}}
"""

# A request the gateway must never pass on unless it read it as a request of its own.
CLOSE = b"Connection: close\r\n"  # each test's last request: no wait for a kept-alive one
SMUGGLED = b"GET /paid/smuggled HTTP/1.1\r\nHost: gw\r\nX-API-Key: secret-one\r\n\r\n"


@dataclass
class Setup:
    proxy_port: int
    upstream: Recording


@asynccontextmanager
async def gateway_before_recorder(tmp_path: Path) -> AsyncIterator[Setup]:
    async with recording_upstream() as upstream:
        config = write_config(tmp_path, API.format(port=upstream.port), server=worker_server_yaml())
        async with running_gateway(config) as worker:
            yield Setup(worker.proxy_port, upstream)


async def exchange(port: int, raw: bytes) -> bytes:
    """Send `raw` on one connection; everything the gateway answers until it closes (or goes
    quiet for half a second: a kept-alive connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        answer = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            while data := await asyncio.wait_for(reader.read(65536), 0.5):
                answer += data
        return answer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def statuses(answer: bytes) -> list[int]:
    """The status of each answer in `answer` (a problem's body is followed by the next head
    without a line break)."""
    return [int(status) for status in re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer)]


async def test_http_1_0_with_transfer_encoding_is_refused_before_the_upstream(
    tmp_path: Path,
) -> None:
    """HTTP/1.0 has no Transfer-Encoding: a proxy in front that reads 1.0 framing sees no body,
    then the chunks as a request of their own. RFC 9112 6.1 calls such framing faulty, and
    nginx answers 400; read as chunked, the gateway let a kept-alive connection go on."""
    chunked = b"%x\r\n%b\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    async with gateway_before_recorder(tmp_path) as setup:
        answer = await exchange(
            setup.proxy_port,
            b"POST /free/a HTTP/1.0\r\nHost: gw\r\nConnection: keep-alive\r\n"
            b"X-API-Key: secret-one\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked + SMUGGLED,
        )
        assert statuses(answer) == [400]
        assert b"an HTTP/1.0 request may not have a Transfer-Encoding" in answer
        assert setup.upstream.received == b""


async def test_a_client_cannot_choose_a_method_the_route_refuses(tmp_path: Path) -> None:
    """The route allows GET and POST on /docs/{id}, and a DELETE there is a 405. A POST with a
    method override reached the upstream with it, and the frameworks that read one (Express's
    method-override, Laravel, Symfony, ASP.NET Core, OData) serve that POST as a DELETE."""
    overrides = (
        b"X-HTTP-Method-Override: DELETE\r\nX-HTTP-Method: DELETE\r\nX-Method-Override: DELETE\r\n"
    )
    async with gateway_before_recorder(tmp_path) as setup:
        refused = await exchange(
            setup.proxy_port,
            b"DELETE /docs/7 HTTP/1.1\r\nHost: gw\r\nX-API-Key: secret-one\r\n" + CLOSE + b"\r\n",
        )
        assert statuses(refused) == [405]
        answer = await exchange(
            setup.proxy_port,
            b"POST /docs/7 HTTP/1.1\r\nHost: gw\r\nX-API-Key: secret-one\r\n"
            + overrides
            + b"Content-Length: 0\r\n"
            + CLOSE
            + b"\r\n",
        )
        assert statuses(answer) == [200]
        head = bytes(setup.upstream.received).lower()
    assert head.startswith(b"post /base/docs/7 http/1.1\r\n")
    assert b"method" not in head and b"delete" not in head


async def test_a_client_cannot_claim_what_a_proxy_states(tmp_path: Path) -> None:
    """X-Forwarded-For is appended to, the rest of what a proxy states is the gateway's own
    (README, "Headers"); the aliases upstream frameworks read for the same (the client's
    address, scheme, port, prefix) or for the URL to serve instead reached the upstream as the
    client wrote them: `X-Forwarded-Ssl: on` is https to Rack whatever X-Forwarded-Proto says,
    and `X-Original-URL: /paid/...` is the path served by IIS' rewrite and old Symfony."""
    claims = (
        b"X-Real-IP: 6.6.6.6\r\nX-Forwarded-Port: 443\r\nX-Forwarded-Prefix: /paid\r\n"
        b"X-Forwarded-Path: /paid/x\r\nX-Forwarded-Server: evil\r\nX-Forwarded-Ssl: on\r\n"
        b"X-Forwarded-Scheme: https\r\nX-Original-URL: /paid/x\r\nX-Rewrite-URL: /paid/x\r\n"
        b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\nX-Forwarded-For: 6.6.6.6\r\n"
    )
    async with gateway_before_recorder(tmp_path) as setup:
        answer = await exchange(
            setup.proxy_port,
            b"GET /free/x HTTP/1.1\r\nHost: gw\r\nX-API-Key: secret-one\r\n"
            + claims
            + CLOSE
            + b"\r\n",
        )
        assert statuses(answer) == [200]
        head = bytes(setup.upstream.received).lower()
    assert head.startswith(b"get /base/free/x http/1.1\r\n")
    for name in (b"x-real-ip", b"x-forwarded-port", b"x-forwarded-prefix", b"x-forwarded-path"):
        assert name not in head
    for name in (b"x-forwarded-server", b"x-forwarded-ssl", b"x-forwarded-scheme"):
        assert name not in head
    assert b"x-original-url" not in head and b"x-rewrite-url" not in head
    assert b"\r\nx-forwarded-for: 6.6.6.6, 127.0.0.1\r\n" in head
    assert b"\r\nx-forwarded-proto: http\r\n" in head
    assert b"\r\nx-forwarded-host: gw\r\n" in head
    assert b"secret-one" not in head


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        (b"/free/x?a=1&api_key=secret-one&b=%20+2", b"/base/free/x?a=1&b=%20+2"),
        (b"/free/x?api_key=&api_key=secret-one&&c", b"/base/free/x?&c"),
        (b"/free/x?%61pi_key=secret-one&z=%2f", b"/base/free/x?z=%2f"),
        (b"/free/x?api%5Fkey=secret%2Done", b"/base/free/x"),
        (b"http://gw/free/x?api_key=secret-one&q", b"/base/free/x?q"),
    ],
    ids=["plain", "twice-one-empty", "escaped-name", "escaped-value", "absolute-form"],
)
async def test_the_key_parameter_never_reaches_the_upstream(
    tmp_path: Path, target: bytes, forwarded: bytes
) -> None:
    """However the parameter is spelt that the gateway reads as the key, it goes; the rest of
    the query keeps every byte."""
    async with gateway_before_recorder(tmp_path) as setup:
        answer = await exchange(
            setup.proxy_port, b"GET %b HTTP/1.1\r\nHost: gw\r\n%b\r\n" % (target, CLOSE)
        )
        assert statuses(answer) == [200]
        assert setup.upstream.request_lines() == [b"GET %b HTTP/1.1" % forwarded]
        assert b"secret" not in setup.upstream.received


@pytest.mark.parametrize(
    "query",
    [b"API_KEY=secret-one", b"api_key[]=secret-one", b"a=1;api_key=secret-one"],
    ids=["other-case", "brackets", "semicolon"],
)
async def test_another_parameter_is_no_key(tmp_path: Path, query: bytes) -> None:
    """A parameter the gateway does not read as the key is the upstream's, as sent (README,
    `auth.query_param`): alone it is a 401, and nothing reaches the upstream."""
    async with gateway_before_recorder(tmp_path) as setup:
        head = b"GET /free/x?%b HTTP/1.1\r\nHost: gw\r\n%b" % (query, CLOSE)
        assert statuses(await exchange(setup.proxy_port, head + b"\r\n")) == [401]
        answer = await exchange(setup.proxy_port, head + b"X-API-Key: secret-one\r\n\r\n")
        assert statuses(answer) == [200]
        assert setup.upstream.request_lines() == [b"GET /base/free/x?%b HTTP/1.1" % query]


# Last on its connection: the gateway closes it after the answer, the test need not wait.
NEXT = b"GET /free/next HTTP/1.1\r\nHost: gw\r\nX-API-Key: secret-one\r\nConnection: close\r\n\r\n"


def with_body(head: bytes, body: bytes) -> bytes:
    return head + b"Content-Length: %d\r\n\r\n%b" % (len(body), body)


@pytest.mark.parametrize(
    ("first", "answers"),
    [
        (with_body(b"POST /free/a HTTP/1.1\r\nHost: gw\r\nX-API-Key: wrong\r\n", SMUGGLED), 401),
        (with_body(b"POST /nowhere HTTP/1.1\r\nHost: gw\r\n", SMUGGLED), 404),
        (
            b"POST /free/a HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n%b\r\n0\r\nX-API-Key: secret-one\r\n\r\n" % (len(SMUGGLED), SMUGGLED),
            401,
        ),
    ],
    ids=["401-length", "404-length", "401-chunked-key-in-trailer"],
)
async def test_after_a_refused_request_the_next_is_read_from_the_right_byte(
    tmp_path: Path, first: bytes, answers: int
) -> None:
    """The body of a request refused before the upstream (which holds a whole request) is
    skipped as its framing says, and the request pipelined after it is the one served."""
    async with gateway_before_recorder(tmp_path) as setup:
        answer = await exchange(setup.proxy_port, first + NEXT)
        assert statuses(answer) == [answers, 200]
        assert setup.upstream.request_lines() == [b"GET /base/free/next HTTP/1.1"]
        assert b"smuggled" not in setup.upstream.received


@pytest.mark.parametrize(
    ("target", "forwarded", "cost"),
    [
        (b"/free/../paid/x", b"/base/paid/x", 100),
        (b"/free/%2e%2E/paid/x", b"/base/paid/x", 100),
        (b"/free;/../paid/x", b"/base/paid/x", 100),
        (b"//paid//x", b"/base/paid/x", 100),
        (b"/%70aid/x", b"/base/paid/x", 100),
        (b"http://gw/free/./../paid/x?q", b"/base/paid/x?q", 100),
        (b"/free/a%2fb", b"/base/free/a%2Fb", 1),
        (b"/free/x?a=/../../paid", b"/base/free/x?a=/../../paid", 1),
    ],
    ids=["dots", "escaped-dots", "semicolon-dots", "empty-segments", "escaped-letter",
         "absolute-form", "escaped-slash", "dots-in-query"],
)  # fmt: skip
async def test_the_upstream_serves_the_path_that_was_routed_and_charged(
    tmp_path: Path, target: bytes, forwarded: bytes, cost: int
) -> None:
    """Routing decides the cost; the upstream gets the very path routing read, so a request
    charged as a cheap route can never reach an expensive route's path."""
    async with gateway_before_recorder(tmp_path) as setup:
        answer = await exchange(
            setup.proxy_port,
            b"GET %b HTTP/1.1\r\nHost: gw\r\nX-API-Key: secret-one\r\n%b\r\n" % (target, CLOSE),
        )
        assert statuses(answer) == [200]
        assert b"\r\nX-Quota-Remaining: %d\r\n" % (100000 - cost) in answer
        assert setup.upstream.request_lines() == [b"GET %b HTTP/1.1" % forwarded]


@pytest.mark.parametrize(
    "target",
    [b"/free/..%2Fpaid/x", b"/free/..%5cpaid/x", b"/free/..\\paid/x", b"/free/..;/paid/x"],
    ids=["escaped-slash", "escaped-backslash", "backslash", "tomcat"],
)
async def test_a_dot_segment_some_upstream_would_see_is_refused(
    tmp_path: Path, target: bytes
) -> None:
    async with gateway_before_recorder(tmp_path) as setup:
        answer = await exchange(
            setup.proxy_port,
            b"GET %b HTTP/1.1\r\nHost: gw\r\nX-API-Key: secret-one\r\n%b\r\n" % (target, CLOSE),
        )
        assert statuses(answer) == [400]
        assert setup.upstream.received == b""


async def test_a_content_length_reaches_the_upstream_in_its_plain_form(tmp_path: Path) -> None:
    """`010` is 10 to the gateway and 8 to a parser that reads a leading 0 as octal (C's strtol
    with base 0): the body's last 2 bytes would begin the next request on that pooled
    connection. The upstream gets the length as the gateway read it, as nginx sends it."""
    async with gateway_before_recorder(tmp_path) as setup:
        answer = await exchange(
            setup.proxy_port,
            b"POST /free/a HTTP/1.1\r\nHost: gw\r\nX-API-Key: secret-one\r\n"
            b"Content-Length: 010\r\n\r\n0123456789" + NEXT,
        )
        assert statuses(answer) == [200, 200]
        received = bytes(setup.upstream.received)
    head, _, rest = received.partition(b"\r\n\r\n")
    assert b"\r\nContent-Length: 10\r\n" in head + b"\r\n"
    assert rest.startswith(b"0123456789GET /base/free/next HTTP/1.1\r\n")


async def test_an_empty_host_states_no_forwarded_host(tmp_path: Path) -> None:
    """`Host:` with no value is served (a target without an authority, RFC 9112 3.2), but
    names no host: the upstream got an empty X-Forwarded-Host line, where Forwarded had none."""
    async with gateway_before_recorder(tmp_path) as setup:
        answer = await exchange(
            setup.proxy_port,
            b"GET /free/x HTTP/1.1\r\nHost:\r\nX-API-Key: secret-one\r\n" + CLOSE + b"\r\n",
        )
        assert statuses(answer) == [200]
        head = bytes(setup.upstream.received).lower()
    assert b"x-forwarded-host" not in head
    assert b"\r\nforwarded: for=127.0.0.1;proto=http\r\n" in head


async def test_the_upstream_is_told_who_called_only_when_it_asks(tmp_path: Path) -> None:
    """With `identity_headers: true` the key's name and plan go upstream as X-Gateway-Key-Name
    and X-Gateway-Plan; what a client sends under those names never does, whether the product
    asks or not: an upstream that trusts them would take a caller's word for who it is."""
    claims = b"X-Gateway-Key-Name: someone-else\r\nX-Gateway-Plan: unlimited\r\n"
    request = b"GET %b HTTP/1.1\r\nHost: gw\r\nX-API-Key: secret-one\r\n" + claims
    async with gateway_before_recorder(tmp_path) as setup:
        answer = await exchange(
            setup.proxy_port,
            request % b"/told/x" + b"\r\n" + request % b"/free/x" + CLOSE + b"\r\n",
        )
        assert statuses(answer) == [200, 200]
        received = bytes(setup.upstream.received).lower()
    asking, not_asking = received.split(b"get /base/free/x http/1.1\r\n")
    assert asking.startswith(b"get /base/told/x http/1.1\r\n")
    assert b"\r\nx-gateway-key-name: client\r\n" in asking
    assert b"\r\nx-gateway-plan: metered\r\n" in asking
    assert b"x-gateway" not in not_asking
    assert b"someone-else" not in received and b"unlimited" not in received
