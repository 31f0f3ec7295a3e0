"""The admin port over real HTTP: probes, /metrics, the usage API and its token."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics
from gateway.admin import ADMIN_HTTP_LOG, build_admin_app
from gateway.config.model import (
    ApiKey,
    AuthConfig,
    Config,
    Plan,
    Product,
    QuotaRule,
    RateRule,
    ServerConfig,
    StorageConfig,
    Upstream,
)
from gateway.limits.base import DayUsage, Limiter, StorageError
from gateway.limits.memory import MemoryLimiter
from gateway.record import RequestRecord
from tests.support.admin_port import SHOP_WITH_QUOTA, TOKEN, bearer
from tests.support.apps import serving_app
from tests.support.config import worker_server_yaml, write_config
from tests.support.gateway import running_gateway

PROBLEM = "application/problem+json"
DAILY = QuotaRule(limit=5, per="day", timezone=ZoneInfo("UTC"))


def _product(name: str) -> Product:
    upstream = Upstream("http://127.0.0.1:9", "http", "127.0.0.1", 9, "")
    return Product(name, upstream, ())


def make_config(storage_timeout: float = 0.25) -> Config:
    plans = {
        "trial": Plan("trial", rate=RateRule(10, 1.0, "second"), quota=DAILY),
        "unmetered": Plan("unmetered", rate=RateRule(100, 60.0, "minute")),
    }
    keys = (
        ApiKey("acme", "0" * 64, {"soccer": "trial", "basket": "unmetered"}),
        ApiKey("retired", "1" * 64, {"soccer": "trial"}, disabled=True),
    )
    return Config(
        server=ServerConfig(),
        storage=StorageConfig(timeout=storage_timeout),
        auth=AuthConfig(),
        # The admin API reads which products there are (to mark a key's entry for one the
        # config lacks), their plans and the keys.
        products={name: _product(name) for name in ("soccer", "basket")},
        plans=plans,
        keys=keys,
    )


class DownStorage(MemoryLimiter):
    """A storage that refuses every call, as an unreachable Redis does once translated."""

    async def ping(self) -> None:
        raise StorageError("connection refused")

    async def usage(self, subject: str, quota: QuotaRule) -> Any:
        raise StorageError("connection refused")

    async def reset_quota(self, subject: str, quota: QuotaRule) -> None:
        raise StorageError("connection refused")


class HangingStorage(MemoryLimiter):
    """A storage that accepts the call and never answers."""

    async def ping(self) -> None:
        await asyncio.sleep(30)


Serve = Callable[..., Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    async with AsyncExitStack() as servers:

        async def start(
            limiter: Limiter | None = None, token: str | None = None, storage_timeout: float = 0.25
        ) -> str:
            config = make_config(storage_timeout)
            app = build_admin_app(lambda: config, limiter or MemoryLimiter(), token=token)
            port = await servers.enter_async_context(serving_app(app))
            return f"http://127.0.0.1:{port}"

        yield start


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_healthz_answers_ok(serve: Serve, http: aiohttp.ClientSession) -> None:
    base = await serve()

    async with http.get(f"{base}/healthz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}


async def test_readyz_is_ready_with_a_config_and_a_storage_that_answers(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    base = await serve(MemoryLimiter())

    async with http.get(f"{base}/readyz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ready"}


async def test_readyz_is_not_ready_when_the_storage_fails(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    base = await serve(DownStorage())

    async with http.get(f"{base}/readyz") as response:
        assert response.status == 503
        body = await response.json()
    assert body["code"] == "storage_unavailable" and body["title"] == "Service Unavailable"


async def test_readyz_gives_up_after_the_storage_timeout(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    base = await serve(HangingStorage(), storage_timeout=0.05)

    started = time.monotonic()
    async with http.get(f"{base}/readyz") as response:
        assert response.status == 503
        assert (await response.json())["code"] == "storage_unavailable"
    assert time.monotonic() - started < 5


async def test_usage_reports_plan_rate_and_quota_per_product(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    limiter = MemoryLimiter()
    for _ in range(3):
        await limiter.hit("acme:soccer", None, DAILY)
    await limiter.hit("someone-else:soccer", None, DAILY)
    base = await serve(limiter)

    async with http.get(f"{base}/admin/usage/acme") as response:
        assert response.status == 200
        body = await response.json()

    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    next_midnight = midnight + timedelta(days=1)
    soccer = body["products"]["soccer"]
    assert body["key"] == "acme" and body["disabled"] is False
    assert soccer["plan"] == "trial"
    assert soccer["rate"] == {"limit": 10, "per": "second", "window_seconds": 1.0}
    quota = soccer["quota"]
    assert {k: quota[k] for k in ("limit", "used", "remaining", "per", "timezone")} == {
        "limit": 5,
        "used": 3,
        "remaining": 2,
        "per": "day",
        "timezone": "UTC",
    }
    assert quota["reset"] == next_midnight.strftime("%Y-%m-%dT%H:%M:%SZ")
    seconds_left = (next_midnight - datetime.now(UTC)).total_seconds()
    assert abs(quota["reset_seconds"] - seconds_left) <= 2
    assert body["products"]["basket"] == {
        "plan": "unmetered",
        "not_in_config": None,
        "rate": {"limit": 100, "per": "minute", "window_seconds": 60.0},
        "quota": None,
    }


async def test_delete_resets_that_quota_only(serve: Serve, http: aiohttp.ClientSession) -> None:
    limiter = MemoryLimiter()
    for _ in range(5):
        await limiter.hit("acme:soccer", None, DAILY)
    await limiter.hit("retired:soccer", None, DAILY)
    assert (await limiter.hit("acme:soccer", None, DAILY)).outcome == "quota_exceeded"
    base = await serve(limiter)

    async with http.delete(f"{base}/admin/usage/acme/soccer") as response:
        assert response.status == 204

    assert (await limiter.usage("acme:soccer", DAILY)).used == 0
    assert (await limiter.usage("retired:soccer", DAILY)).used == 1
    assert (await limiter.hit("acme:soccer", None, DAILY)).outcome == "allowed"


@pytest.mark.parametrize(
    ("method", "path", "body", "detail"),
    [
        # Last month's use is not what a reset resets: taken bare, this one reset this month's.
        ("DELETE", "/admin/usage/acme/soccer?period=2026-11", None, "period: unknown parameter"),
        ("DELETE", "/admin/usage/acme/soccer", b'{"period": "2026-11"}', "period: unknown field"),
        ("DELETE", "/admin/usage/acme/soccer", b"all", "body: not valid JSON"),
        ("POST", "/admin/usage/acme/soccer/credit?amount=9", b'{"amount": 1}', "amount: unknown"),
        ("GET", "/admin/usage/acme?product=soccer", None, "product: unknown parameter"),
    ],
)
async def test_a_query_or_body_a_usage_call_does_not_take_is_refused(
    serve: Serve, http: aiohttp.ClientSession, method: str, path: str, body: Any, detail: str
) -> None:
    limiter = MemoryLimiter()
    await limiter.hit("acme:soccer", None, DAILY)
    base = await serve(limiter)

    async with http.request(method, f"{base}{path}", data=body) as response:
        problem = await response.json(content_type=None)
    assert response.status == 400, problem
    assert response.content_type == PROBLEM
    assert problem["code"] == "bad_request" and problem["detail"].startswith(detail), problem
    usage = await limiter.usage("acme:soccer", DAILY)
    assert (usage.used, usage.credit) == (1, 0)  # neither reset nor credited


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/usage/nobody"),
        ("DELETE", "/admin/usage/nobody/soccer"),
        ("DELETE", "/admin/usage/acme/hockey"),  # no plan for that product
        ("DELETE", "/admin/usage/acme/basket"),  # a plan without a quota
        ("GET", "/admin/nothing-here"),
    ],
)
async def test_unknown_keys_and_products_are_404_not_found(
    serve: Serve, http: aiohttp.ClientSession, method: str, path: str
) -> None:
    base = await serve(MemoryLimiter())

    async with http.request(method, f"{base}{path}") as response:
        assert response.status == 404
        assert response.content_type == PROBLEM
        body = await response.json()
    assert (body["title"], body["code"], body["status"]) == ("Not Found", "not_found", 404)
    assert body["request_id"] == response.headers["X-Request-ID"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/healthz", 200),
        ("GET", "/readyz", 200),
        ("GET", "/metrics", 200),
        ("GET", "/admin/usage/acme", 200),
        ("GET", "/admin/usage/nobody", 404),
        ("GET", "/admin/usage.csv", 200),
    ],
)
async def test_every_answer_carries_the_callers_request_id_or_a_new_one(
    serve: Serve, http: aiohttp.ClientSession, method: str, path: str, status: int
) -> None:
    """As on the proxy port (README, "Headers"): the client's X-Request-ID if it is sane, else
    a new one; a problem's body names the same id."""
    base = await serve(MemoryLimiter())
    seen = set()
    for sent in ("call-42", "not sane!", None):
        headers = {"X-Request-ID": sent} if sent is not None else {}
        async with http.request(method, f"{base}{path}", headers=headers) as response:
            assert response.status == status
            given = response.headers["X-Request-ID"]
            if status >= 400:
                assert (await response.json())["request_id"] == given
            else:
                await response.read()
        if sent == "call-42":
            assert given == "call-42"
        else:
            assert given != sent and re.fullmatch("[0-9a-f]{32}", given)
        seen.add(given)
    assert len(seen) == 3


async def test_a_failing_storage_makes_the_usage_api_503(
    serve: Serve, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    base = await serve(DownStorage())

    for method, path in (("GET", "/admin/usage/acme"), ("DELETE", "/admin/usage/acme/soccer")):
        caplog.clear()
        async with http.request(method, f"{base}{path}") as response:
            assert response.status == 503, path
            assert (await response.json())["code"] == "storage_unavailable"
            assert response.headers["Retry-After"] == "1"
        # The client is told to retry; the operator is told why.
        assert any("admin API:" in r.getMessage() for r in caplog.records), path


async def test_a_wrong_method_is_405_with_allow(serve: Serve, http: aiohttp.ClientSession) -> None:
    base = await serve()

    async with http.post(f"{base}/healthz") as response:
        assert response.status == 405
        assert response.content_type == PROBLEM
        assert "GET" in response.headers["Allow"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("wrong"),
        bearer(TOKEN + "x"),
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
    ],
)
async def test_with_a_token_the_admin_api_refuses_other_credentials(
    serve: Serve, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    limiter = MemoryLimiter()
    await limiter.hit("acme:soccer", None, DAILY)
    base = await serve(limiter, token=TOKEN)

    for method, path in (("GET", "/admin/usage/acme"), ("DELETE", "/admin/usage/acme/soccer")):
        async with http.request(method, f"{base}{path}", headers=headers) as response:
            assert response.status == 401
            assert response.content_type == PROBLEM
            assert (await response.json())["code"] == "unauthorized"
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    # Refused before anything was touched.
    assert (await limiter.usage("acme:soccer", DAILY)).used == 1


async def test_with_a_token_the_right_bearer_is_let_in_and_probes_need_none(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    base = await serve(MemoryLimiter(), token=TOKEN)

    async with http.get(f"{base}/admin/usage/acme", headers=bearer(TOKEN)) as response:
        assert response.status == 200
    lower_case = {"authorization": "bearer " + TOKEN}  # the scheme is case-insensitive
    async with http.get(f"{base}/admin/usage/acme", headers=lower_case) as response:
        assert response.status == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        async with http.get(f"{base}{path}") as response:
            assert response.status == 200, path


def test_an_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        build_admin_app(make_config, MemoryLimiter(), token="")


async def test_metrics_serves_the_prometheus_text_with_observed_requests(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    base = await serve(token=TOKEN)
    metrics.observe_request(
        RequestRecord(
            request_id="r",
            method="GET",
            path="/admin-test",
            start=0.0,
            status=418,
            code="upstream",
            product="admin-test",
            route="/admin-test",
            duration=0.001,
        )
    )

    async with http.get(f"{base}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()

    counted = [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gateway_requests_total" and sample.labels["product"] == "admin-test"
    ]
    assert len(counted) == 1 and counted[0].value >= 1
    assert counted[0].labels["status"] == "418"


async def test_a_request_that_is_not_http_is_one_line_in_the_log_without_its_bytes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp logged it at ERROR with a traceback quoting the bad line: here, the token."""
    caplog.set_level(logging.INFO)
    api = """
products:
  shop:
    upstream: {url: "http://127.0.0.1:9"}
    routes: [{path: "/shop/{rest:path}"}]
"""
    config = write_config(tmp_path / "config", api, server=worker_server_yaml())
    async with running_gateway(config, env={"GATEWAY_ADMIN_TOKEN": "s3cret-admin"}) as worker:
        reader, writer = await asyncio.open_connection("127.0.0.1", worker.admin_port)
        writer.write(b"GET /admin/keys HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readline()).split()[1] == b"401"  # the token is in force
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", worker.admin_port)
        writer.write(
            b"GET /admin/keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret-admin\x01\r\n\r\n"
        )
        status_line = await reader.readline()
        writer.close()
    assert status_line.split()[1] == b"400"
    assert not any("s3cret" in r.getMessage() or r.exc_info for r in caplog.records)
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)
    assert any("that is not valid HTTP (" in r.getMessage() for r in caplog.records)


async def test_the_export_has_no_head_and_a_client_leaving_it_is_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ended = asyncio.Event()  # the export was closed: the handler's write failed, or it ended

    class SlowExport(MemoryLimiter):
        async def export(
            self, first_day: int, last_day: int
        ) -> AsyncGenerator[list[DayUsage], None]:
            try:
                await asyncio.sleep(0.3)
                yield [DayUsage(first_day, "acme:soccer", "trial", 1, 1)]
            finally:
                ended.set()

    # As the worker serves it: a handler goes on when its client hangs up.
    app = build_admin_app(make_config, SlowExport(), token=None)
    runner = web.AppRunner(app, access_log=None, logger=ADMIN_HTTP_LOG)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = int(runner.addresses[0][1])
        # A HEAD would run the whole export for a head that cannot tell its length (aiohttp's
        # own HEAD sent the body, and broke the connection's next answer).
        url = f"http://127.0.0.1:{port}/admin/usage.csv"
        async with aiohttp.ClientSession() as http, http.head(url) as response:
            assert (response.status, response.headers["Allow"]) == (405, "GET")
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /admin/usage.csv HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        writer.close()  # before the first line is ready
        await asyncio.wait_for(ended.wait(), 10)
        await asyncio.sleep(0.05)  # for the handler to finish after its failed write
    finally:
        await runner.cleanup()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_slow_or_encoded_body_and_a_slow_head_get_clear_answers(
    tmp_path: Path,
) -> None:
    """As on the proxy port: a body must arrive within client_body (408), a head within
    client_header (the connection closed: aiohttp has no 408 of its own for it). A body in a
    content coding is refused by name, where aiohttp's decoding answered a 500 for a gzip body
    that was not gzip and a plain-text 400 for brotli."""
    server = worker_server_yaml(client_header="300ms", client_body="300ms")
    config = write_config(tmp_path / "config", SHOP_WITH_QUOTA, server=server)
    credit = "/admin/usage/acme/shop/credit"
    token = {"GATEWAY_ADMIN_TOKEN": TOKEN}
    async with running_gateway(config, env=token) as worker, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{worker.admin_port}{credit}"
        async with http.post(url, json={"amount": 1}) as response:
            assert response.status == 401  # the token is in force
        for coding in ("gzip", "br", "bogus"):
            headers = {**bearer(TOKEN), "Content-Encoding": coding}
            async with http.post(url, data=b"not encoded", headers=headers) as response:
                problem = await response.json(content_type=PROBLEM)
            assert (response.status, problem["code"]) == (415, "unsupported_media_type"), coding
            assert problem["detail"].startswith("Content-Encoding: ")
            assert response.headers["Accept-Encoding"] == "identity"

        reader, writer = await asyncio.open_connection("127.0.0.1", worker.admin_port)
        writer.write(
            f"POST {credit} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Length: 20\r\n\r\n{".encode()
        )
        started = time.monotonic()
        # The whole answer, then the connection's end: what is left of the body is still read
        # for a while (so that the client is not sent a reset), but the FIN does not wait.
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert b'"detail": "body: did not arrive within 0.3s (client_body)"' in answer
        assert time.monotonic() - started < 5  # loose: a busy CI box

        reader, writer = await asyncio.open_connection("127.0.0.1", worker.admin_port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        assert time.monotonic() - started < 5


@pytest.mark.parametrize("method", ["GET", "PUT"], ids=["unknown-path", "wrong-method"])
async def test_a_call_the_router_refuses_leaves_no_cycle(
    serve: Serve, http: aiohttp.ClientSession, method: str
) -> None:
    """aiohttp's router raises the same 404 or 405 it keeps in the call's match info: once raised,
    its traceback holds the middleware's frame, which holds the call, which holds the match info.
    Every such call (a scanner, a typo in a script) was a cycle for the collector, which a
    reload's gc.freeze kept for good, the call with it. (aiohttp's error route for it still
    refers to itself: a few small objects, none of the call's.)"""
    base = await serve()
    path = "/admin/nowhere" if method == "GET" else "/healthz"
    for _ in range(3):  # the session's own first-use objects out of the way
        async with http.request(method, base + path) as response:
            await response.read()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        async with http.request(method, base + path) as response:
            assert response.status in (404, 405)
            await response.read()
        gc.collect()
        kept = {type(thing).__name__ for thing in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not kept & {"Request", "RawRequestMessage", "MatchInfoError", "NotFound"}, kept
