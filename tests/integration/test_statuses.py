"""Every status the gateway answers itself before limits, end to end over real sockets: the
key (a request admitted, two keys), the route (404, 400, 405, 410, redirects, paths), the
upstream (answers passed through, 502, 504, 499), and a 500 that hides its internals.

The request as it comes over the wire is in test_statuses_wire.py, what an answered request
leaves behind in test_statuses_leaks.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
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
from tests.support.statuses import API, INFO, KEY, problem_of, raw_answer, url
from tests.support.upstream import UPSTREAM_LIMIT_HEADERS, Upstream

UPSTREAM_LIMIT_HEADERS_LOWER = {
    name.lower(): value for name, value in UPSTREAM_LIMIT_HEADERS.items()
}


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
    "headers",
    [[], [("X-API-Key", "made-up")], [("X-API-Key", "secret-1"), ("X-API-Key", "secret-rated")]],
    ids=["no-key", "unknown-key", "two-keys"],
)
async def test_every_401_carries_a_challenge(
    gateway: Worker, client: aiohttp.ClientSession, headers: list[tuple[str, str]]
) -> None:
    """RFC 9110, 15.5.2: a 401 MUST carry WWW-Authenticate. Kong's key-auth sends `Key` (a
    bug fixed in Kong 3.6 where some of its 401s lacked it); the proxy's 401s had none."""
    async with client.get(url(gateway, INFO), headers=headers) as r:
        assert r.status == 401
        assert r.headers.getall("WWW-Authenticate") == ['Key realm="gateway"']
        assert (await r.json())["code"] == "unauthorized"


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
        settles: bool = False,
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
