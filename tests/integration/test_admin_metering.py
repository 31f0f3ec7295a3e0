"""The metering part of the admin API over real HTTP, against storages that fail on purpose:
503 before an export begins, a cut answer when it fails midway, and the default date range."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from aiohttp import web

from gateway.admin import build_admin_app
from gateway.config.model import (
    ApiKey,
    AuthConfig,
    Config,
    Plan,
    QuotaRule,
    ServerConfig,
    StorageConfig,
)
from gateway.limits.base import DayUsage, Limiter, StorageError, day_number
from gateway.limits.memory import MemoryLimiter

DAILY = QuotaRule(limit=5, per="day", timezone=ZoneInfo("UTC"))
# 2026-12-15 12:00 UTC
NOW = datetime(2026, 12, 15, 12, tzinfo=UTC).timestamp()


def make_config() -> Config:
    return Config(
        server=ServerConfig(),
        storage=StorageConfig(timeout=0.25),
        auth=AuthConfig(),
        products={},
        plans={"trial": Plan("trial", quota=DAILY)},
        keys=(ApiKey("acme", "0" * 64, {"soccer": "trial"}),),
    )


class DownStorage(MemoryLimiter):
    """Every metering call fails, as an unreachable Redis does once translated."""

    async def credit(
        self, subject: str, quota: QuotaRule, amount: int, once: str | None = None
    ) -> Any:
        raise StorageError("connection refused")

    async def history(self, key_name: str, first_day: int, last_day: int) -> list[DayUsage]:
        raise StorageError("connection refused")

    async def export(self, first_day: int, last_day: int) -> AsyncGenerator[list[DayUsage], None]:
        raise StorageError("connection refused")
        yield []  # an async generator, as the protocol asks


class BreakingStorage(MemoryLimiter):
    """An export whose storage fails after the first batch."""

    async def export(self, first_day: int, last_day: int) -> AsyncGenerator[list[DayUsage], None]:
        yield [DayUsage(first_day, "acme:soccer", "trial", 3, 3)]
        raise StorageError("connection lost")


Serve = Callable[[Limiter], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def start(limiter: Limiter) -> str:
        config = make_config()
        runner = web.AppRunner(
            build_admin_app(lambda: config, limiter, token=None, clock=lambda: NOW)
        )
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_a_storage_that_does_not_answer_is_503(serve: Serve) -> None:
    base = await serve(DownStorage())
    async with aiohttp.ClientSession() as http:
        for method, path in (
            ("POST", "/admin/usage/acme/soccer/credit"),
            ("GET", "/admin/usage/acme/history"),
            ("GET", "/admin/usage.csv"),
        ):
            async with http.request(method, base + path, json={"amount": 1}) as response:
                body = await response.json(content_type=None)
                assert (response.status, body["code"]) == (503, "storage_unavailable"), path
                assert response.headers["Retry-After"] == "1"


class BuggyExport(MemoryLimiter):
    """An export with a bug that shows after the first batch."""

    async def export(self, first_day: int, last_day: int) -> AsyncGenerator[list[DayUsage], None]:
        yield [DayUsage(first_day, "acme:soccer", "trial", 3, 3)]
        raise KeyError("a bug")


@pytest.mark.parametrize("storage", [BreakingStorage, BuggyExport], ids=["storage", "bug"])
async def test_an_export_that_fails_midway_is_cut_short(
    serve: Serve, storage: type[MemoryLimiter]
) -> None:
    """Cut: no final chunk, so the client knows it is incomplete (a 500 problem written after
    the first lines would land inside the CSV)."""
    base = await serve(storage())
    async with aiohttp.ClientSession() as http, http.get(base + "/admin/usage.csv") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


async def test_default_range_is_this_month_and_history_is_kept_400_days(serve: Serve) -> None:
    seen: list[tuple[int, int]] = []

    class Recording(MemoryLimiter):
        async def history(self, key_name: str, first_day: int, last_day: int) -> list[DayUsage]:
            seen.append((first_day, last_day))
            return []

    base = await serve(Recording())
    async with aiohttp.ClientSession() as http:
        for query in ("", "?to=2026-11-20", "?from=2020-01-01&to=2027-01-01"):
            async with http.get(f"{base}/admin/usage/acme/history{query}") as response:
                assert response.status == 200
    assert seen == [
        (day_number("2026-12-01"), day_number("2026-12-15")),
        (day_number("2026-11-01"), day_number("2026-11-20")),
        (day_number("2026-12-15") - 400, day_number("2026-12-15")),
    ]


async def test_a_deleted_keys_history_is_empty_in_a_range_without_use_not_404(
    serve: Serve,
) -> None:
    """The history of a key no longer in the config (deleted) stays the business's record: a
    month without use is an empty list, as for a key that exists, and 404 is for a name with
    no history kept at all. A range without use was 404 "none by that name has history"."""
    now = [datetime(2026, 11, 10, 12, tzinfo=UTC).timestamp()]
    limiter = MemoryLimiter(clock=lambda: now[0])
    await limiter.hit("gone:soccer", None, DAILY, plan="trial")
    now[0] = NOW
    base = await serve(limiter)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/admin/usage/gone/history?from=2026-11-01") as response:
            assert response.status == 200
            days = (await response.json())["days"]
            assert [(d["date"], d["requests"]) for d in days] == [("2026-11-10", 1)]
        async with http.get(f"{base}/admin/usage/gone/history") as response:
            assert response.status == 200  # December: nothing used
            assert (await response.json())["days"] == []
        async with http.get(f"{base}/admin/usage/never/history") as response:
            assert response.status == 404
            body = await response.json(content_type=None)
            assert body["detail"] == (
                "No key is named 'never', and none by that name has history in the 400 days kept."
            )
