"""Every status the gateway answers itself before limits, end to end over real sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from gateway import accesslog
from gateway.config.model import QuotaRule, RateRule
from gateway.limits.base import Abandoned, Decision, QuotaUsage
from gateway.limits.memory import MemoryLimiter
from gateway.server import Worker
from tests.support.config import worker_server_yaml, write_config
from tests.support.gateway import running_gateway
from tests.support.sockets import closed_port
from tests.support.upstream import UPSTREAM_LIMIT_HEADERS, Upstream, running_upstream

API = """
products:
  soccer:
    upstream: {{url: "{upstream}/base", connect_timeout: 1s, timeout: 500ms}}
    routes:
      - path: /soccer/v4/{{lang}}/competitions/{{competition_id}}/info.json
        methods: [GET]
        params:
          lang: {{enum: [en, de, fr]}}
          competition_id: {{pattern: "sr:competition:[0-9]+"}}
        query:
          limit: {{type: int, min: 1, max: 100, required: false}}
      - path: /soccer/v5/{{rest:path}}
      - path: /soccer/v3/{{rest:path}}
        gone: {{sunset: "2026-01-01"}}
      - path: /soccer/retired
        gone: true
      - path: /soccer/latest/{{rest:path}}
        redirect: {{to: "/soccer/v4/{{rest}}", permanent: false}}
      - path: /soccer/old/{{rest:path}}
        redirect: {{to: "/soccer/v4/{{rest}}", permanent: true}}
      - path: /soccer/moved/{{rest:path}}
        redirect: {{to: "/soccer/v4/{{rest}}?from=moved"}}
  refused:
    upstream: {{url: "http://127.0.0.1:{closed_port}"}}
    routes: [{{path: "/refused/{{rest:path}}"}}]
plans:
  open: {{}}
  rated: {{rate: {{limit: 100, per: second}}}}
keys:
  - name: tester
    key: secret-1
    plans: {{soccer: open, refused: open}}
  - name: rated
    key: secret-rated
    plans: {{soccer: rated}}
"""

KEY = {"X-API-Key": "secret-1"}
RATED = {"X-API-Key": "secret-rated"}
UPSTREAM_LIMIT_HEADERS_LOWER = {
    name.lower(): value for name, value in UPSTREAM_LIMIT_HEADERS.items()
}


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with running_upstream() as server:
        yield server


@pytest.fixture
async def gateway(tmp_path: Path, upstream: Upstream) -> AsyncIterator[Worker]:
    config = write_config(
        tmp_path / "config",
        API.format(upstream=upstream.url, closed_port=closed_port()),
        server=worker_server_yaml(client_header="300ms", client_body="300ms"),
    )
    async with running_gateway(config) as worker:
        yield worker


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def url(gateway: Worker, path: str) -> str:
    return f"http://127.0.0.1:{gateway.proxy_port}{path}"


async def problem_of(response: aiohttp.ClientResponse) -> dict[str, object]:
    assert response.headers["Content-Type"] == "application/problem+json"
    body = json.loads(await response.read())
    assert body["type"] == "about:blank"
    assert body["status"] == response.status
    assert body["request_id"] == response.headers["X-Request-ID"]
    return body  # type: ignore[no-any-return]


INFO = "/soccer/v4/en/competitions/sr:competition:17/info.json"


async def test_admitted_request_reaches_upstream_without_the_key(
    gateway: Worker, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async with client.get(url(gateway, INFO + "?limit=5&api_key=secret-1&x=1"), headers={}) as r:
        assert r.status == 200
        assert r.headers["X-Upstream"] == "yes"
        assert len(r.headers["X-Request-ID"]) >= 16
    (seen,) = upstream.seen
    assert seen.path_qs == "/base" + INFO + "?limit=5&x=1"
    names = {name.lower() for name, _ in seen.headers}
    assert "x-api-key" not in names
    assert "x-request-id" in names


@pytest.mark.parametrize(
    ("lines", "query", "detail"),
    [
        (b"X-API-Key: secret-1\r\nx-api-key: secret-rated\r\n", "", "X-API-Key header"),
        (b"X-API-Key: secret-1\r\n", "?api_key=secret-rated", "header and the api_key query"),
        (b"", "?api_key=secret-1&api_key=secret-rated", "api_key query parameter"),
    ],
    ids=["two-headers", "header-and-query", "two-query-params"],
)
async def test_two_different_keys_are_401(
    gateway: Worker, upstream: Upstream, lines: bytes, query: str, detail: str
) -> None:
    # Charging either key would be a guess, and a proxy in front may have read the other.
    head = b"GET %b HTTP/1.1\r\nHost: t\r\n%bConnection: close\r\n\r\n"
    raw = await raw_answer(gateway, head % ((INFO + query).encode(), lines))
    assert raw.split(b"\r\n", 1)[0] == b"HTTP/1.1 401 Unauthorized"
    problem = json.loads(raw.partition(b"\r\n\r\n")[2])
    assert problem["code"] == "unauthorized"
    assert detail in problem["detail"]
    assert upstream.seen == []


@pytest.mark.parametrize(
    ("lines", "query"),
    [
        (b"X-API-Key: secret-1\r\nx-api-key: secret-1\r\n", ""),
        (b"X-API-Key: secret-1\r\n", "?api_key=secret-1"),
        (b"X-API-Key:\r\n", "?api_key=secret-1&api_key=secret-1"),
    ],
    ids=["header-twice", "header-and-query", "empty-header-and-query-twice"],
)
async def test_the_same_key_sent_twice_is_one_key(
    gateway: Worker, upstream: Upstream, lines: bytes, query: str
) -> None:
    head = b"GET %b HTTP/1.1\r\nHost: t\r\n%bConnection: close\r\n\r\n"
    raw = await raw_answer(gateway, head % ((INFO + query).encode(), lines))
    assert raw.split(b"\r\n", 1)[0] == b"HTTP/1.1 200 OK"
    (seen,) = upstream.seen
    assert "secret-1" not in json.dumps([seen.path_qs, seen.headers])


async def test_404_invalid_route(gateway: Worker, client: aiohttp.ClientSession) -> None:
    async with client.get(url(gateway, "/nowhere/at/all"), headers=KEY) as r:
        assert r.status == 404
        body = await problem_of(r)
    assert (body["title"], body["code"]) == ("Invalid route", "invalid_route")


async def test_404_wrong_identifier(gateway: Worker, client: aiohttp.ClientSession) -> None:
    path = "/soccer/v4/en/competitions/sr:team:17/info.json"
    async with client.get(url(gateway, path), headers=KEY) as r:
        assert r.status == 404
        body = await problem_of(r)
    assert (body["title"], body["code"]) == ("Wrong identifier", "wrong_identifier")
    assert "competition_id" in str(body["detail"])


@pytest.mark.parametrize(
    ("path", "names"),
    [
        ("/soccer/v4/xx/competitions/sr:competition:1/info.json", "lang"),
        (INFO + "?limit=abc", "limit"),
        (INFO + "?limit=500", "limit"),
        (INFO + "?limit=0", "limit"),
    ],
)
async def test_400_names_the_parameter(
    gateway: Worker, upstream: Upstream, client: aiohttp.ClientSession, path: str, names: str
) -> None:
    async with client.get(url(gateway, path), headers=KEY) as r:
        assert r.status == 400
        body = await problem_of(r)
    assert (body["title"], body["code"]) == ("Bad Request", "bad_request")
    assert names in str(body["detail"])
    assert upstream.seen == []


async def test_405_with_allow(gateway: Worker, client: aiohttp.ClientSession) -> None:
    async with client.post(url(gateway, INFO), headers=KEY) as r:
        assert r.status == 405
        body = await problem_of(r)
        assert r.headers["Allow"] == "GET, HEAD"
    assert body["code"] == "method_not_allowed"


async def test_410_with_sunset(gateway: Worker, client: aiohttp.ClientSession) -> None:
    async with client.get(url(gateway, "/soccer/v3/anything/here")) as r:
        assert r.status == 410
        body = await problem_of(r)
        assert r.headers["Sunset"] == "Thu, 01 Jan 2026 00:00:00 GMT"
    assert (body["title"], body["code"]) == ("Gone", "gone")
    async with client.get(url(gateway, "/soccer/retired")) as r:
        assert r.status == 410
        assert "Sunset" not in r.headers


@pytest.mark.parametrize(("prefix", "status"), [("latest", 302), ("old", 301)])
async def test_redirect_keeps_rest_and_query(
    gateway: Worker, client: aiohttp.ClientSession, prefix: str, status: int
) -> None:
    path = f"/soccer/{prefix}/en/competitions/sr:competition:17/info.json?limit=3"
    async with client.get(url(gateway, path), allow_redirects=False) as r:
        assert r.status == status
        assert r.headers["Location"] == INFO + "?limit=3"
        assert "X-Request-ID" in r.headers


MOVED = "/soccer/moved/en/competitions/sr:competition:17/info.json?limit=3"


@pytest.mark.parametrize(
    ("path", "location"),
    [
        # A target with a query of its own: the request's joins it after `&`.
        (MOVED, INFO + "?from=moved&limit=3"),
        # Never the key, which the target (perhaps another host's) has no business seeing.
        (MOVED + "&api_key=secret-1", INFO + "?from=moved&limit=3"),
        # `group%2Fproject` is one segment: the target must not make it two.
        (
            "/soccer/latest/en/group%2Fproject/a%20b?limit=3",
            "/soccer/v4/en/group%2Fproject/a%20b?limit=3",
        ),
    ],
    ids=["joined-queries", "no-key", "escaped-slash"],
)
async def test_a_redirect_target(
    gateway: Worker, client: aiohttp.ClientSession, path: str, location: str
) -> None:
    async with client.get(url(gateway, path), allow_redirects=False) as r:
        assert r.status == 302
        assert r.headers["Location"] == location


@pytest.mark.parametrize(
    "path",
    [
        "/soccer/v%33/anything",  # an escaped unreserved character
        "/soccer/v5/../v3/anything",  # a dot segment
        "/soccer/v5/%2E%2E/v3/anything",  # an escaped one
        "/soccer//v3/anything",  # an empty segment
    ],
)
async def test_a_retired_route_cannot_be_reached_by_another_spelling(
    gateway: Worker, upstream: Upstream, client: aiohttp.ClientSession, path: str
) -> None:
    async with client.get(URL(url(gateway, path), encoded=True), headers=KEY) as r:
        assert r.status == 410
    assert upstream.seen == []


@pytest.mark.parametrize(
    "path", ["/soccer/v5/..%2Fv3/anything", "/soccer/v5/..;/v3/anything", "/soccer/v5/..%5cv3/x"]
)
async def test_a_dot_segment_hidden_from_routing_is_400(
    gateway: Worker, upstream: Upstream, client: aiohttp.ClientSession, path: str
) -> None:
    async with client.get(URL(url(gateway, path), encoded=True), headers=KEY) as r:
        assert r.status == 400
        body = await problem_of(r)
    assert "dot segment" in str(body["detail"])
    assert upstream.seen == []


async def test_the_upstream_gets_the_path_the_routes_read(
    gateway: Worker, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    path = "/soccer/v5/%7e%41b/./x/../c%2fd%20e"
    async with client.get(URL(url(gateway, path), encoded=True), headers=KEY) as r:
        assert r.status == 200
    (seen,) = upstream.seen
    assert seen.raw_path == "/base/soccer/v5/~Ab/c%2Fd%20e"


@pytest.mark.parametrize("status", [304, 404, 500, 503])
async def test_upstream_answers_pass_through(
    gateway: Worker, client: aiohttp.ClientSession, status: int
) -> None:
    async with client.get(url(gateway, f"/soccer/v5/status/{status}"), headers=KEY) as r:
        assert r.status == status
        assert r.headers.get("Content-Type") != "application/problem+json"


@pytest.mark.parametrize(
    ("key", "gateway_names"),
    [
        ("secret-1", set()),
        ("secret-rated", {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"}),
    ],
    ids=["no-limits", "rate-only"],
)
async def test_an_upstreams_limit_headers_never_reach_the_client(
    gateway: Worker, client: aiohttp.ClientSession, key: str, gateway_names: set[str]
) -> None:
    # The upstream's limits are the gateway's own use of it, shared by every client: a plan
    # that does not limit something must not pass the upstream's figure off as the client's.
    path = url(gateway, "/soccer/v5/limit-headers")
    async with client.get(path, headers={"X-API-Key": key}) as r:
        assert r.status == 200
        assert r.headers["X-Upstream"] == "yes"
        sent = {name.lower() for name in r.headers} & {n.lower() for n in UPSTREAM_LIMIT_HEADERS}
        assert sent == gateway_names | (
            {"ratelimit-policy", "ratelimit"} if gateway_names else set()
        )
        for name in gateway_names:
            assert r.headers.getall(name) != [UPSTREAM_LIMIT_HEADERS_LOWER[name]]
            assert len(r.headers.getall(name)) == 1
        if gateway_names:
            assert r.headers["X-RateLimit-Limit"] == "100"
            assert r.headers["RateLimit-Policy"] == '"rate";q=100;w=1'


async def test_502_when_upstream_refuses(gateway: Worker, client: aiohttp.ClientSession) -> None:
    async with client.get(url(gateway, "/refused/x"), headers=KEY) as r:
        assert r.status == 502
        body = await problem_of(r)
    assert (body["title"], body["code"]) == ("Bad Gateway", "bad_gateway")


async def test_504_when_upstream_is_slow(gateway: Worker, client: aiohttp.ClientSession) -> None:
    async with client.get(url(gateway, "/soccer/v5/x/slow?for=3"), headers=KEY) as r:
        assert r.status == 504
        body = await problem_of(r)
    assert (body["title"], body["code"]) == ("Gateway Timeout", "gateway_timeout")


async def test_499_cancels_the_upstream_request(
    gateway: Worker, upstream: Upstream, capsys: pytest.CaptureFixture[str]
) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
    writer.write(
        b"GET /soccer/v5/x/slow?for=0.45 HTTP/1.1\r\nHost: t\r\nX-API-Key: secret-1\r\n\r\n"
    )
    await writer.drain()
    await asyncio.wait_for(upstream.started_slow.wait(), 2)
    writer.close()
    await asyncio.wait_for(upstream.cancelled.wait(), 0.4)
    await asyncio.sleep(0.05)
    accesslog.flush_access_log()  # the serving worker batches its lines
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    assert any(line["status"] == 499 and line["code"] == "client_closed" for line in lines)


async def read_all(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(-1), 3)


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


async def raw_answer(gateway: Worker, head: bytes) -> bytes:
    """The whole answer to a request head sent as these bytes (with `Connection: close`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
    writer.write(head)
    raw = await read_all(reader)
    writer.close()
    return raw


async def raw_status(gateway: Worker, head: bytes) -> bytes:
    """The status code the gateway answers a request head sent as these bytes."""
    raw = await raw_answer(gateway, head)
    return raw.split(b"\r\n", 1)[0].split(b" ")[1]


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


class BrokenLimiter(MemoryLimiter):
    """A limiter with a bug in it: what a 500 looks like from the outside."""

    async def hit(
        self,
        subject: str,
        rate: RateRule | None,
        quota: QuotaRule | None,
        cost: int = 1,
        plan: str = "",
        abandoned: Abandoned | None = None,
    ) -> Decision:
        raise KeyError("internal detail that must not leak")

    async def usage(self, subject: str, quota: QuotaRule) -> QuotaUsage:
        raise NotImplementedError

    async def reset_quota(self, subject: str, quota: QuotaRule) -> None:
        raise NotImplementedError

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


def _config_with_a_rate(tmp_path: Path, upstream: Upstream) -> Path:
    """The test API with a rate on the open plan, so a request reaches the limit step."""
    return write_config(
        tmp_path / "c",
        API.format(upstream=upstream.url, closed_port=closed_port()).replace(
            "open: {}", "open: {rate: {limit: 5, per: second}}"
        ),
        server=worker_server_yaml(),
    )


async def test_500_hides_internals_and_logs_the_traceback(
    tmp_path: Path,
    upstream: Upstream,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = _config_with_a_rate(tmp_path, upstream)
    async with running_gateway(config) as worker:
        worker.runtime.limiter = BrokenLimiter()
        with caplog.at_level(logging.ERROR):
            async with client.get(url(worker, INFO), headers=KEY) as r:
                assert r.status == 500
                body = await problem_of(r)
    assert (body["title"], body["code"]) == ("Internal Server Error", "internal_error")
    assert "internal detail" not in json.dumps(body)
    assert "internal detail that must not leak" in caplog.text


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


class BrokenDestinations(dict[str, object]):
    """Destinations with a bug in them, reached after the limits were applied."""

    def __getitem__(self, name: str) -> object:
        raise RuntimeError("internal detail that must not leak")


async def test_500_after_the_limit_step_keeps_the_limit_headers(
    tmp_path: Path, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    config = _config_with_a_rate(tmp_path, upstream)
    async with running_gateway(config) as worker:
        runtime = worker.runtime
        runtime.snapshot = dataclasses.replace(
            runtime.snapshot,
            destinations=BrokenDestinations(),  # type: ignore[arg-type]
        )
        async with client.get(url(worker, INFO), headers=KEY) as r:
            assert r.status == 500
            body = await problem_of(r)
            assert r.headers["X-RateLimit-Remaining"] == "4"
            assert r.headers["RateLimit"].startswith('"rate";r=4;')
    assert "internal detail" not in json.dumps(body)


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
