"""Keys, plans and limits end to end: real requests on the proxy port, real admin calls on the
admin port of the same gateway, for each limit storage (memory, a redis-server, a Redis Cluster).

The Redis storages are shared by the session, so every test names its keys with a fresh suffix.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest

from tests.support.answers import Answer
from tests.support.config import worker_server_yaml, write_config
from tests.support.gateway import running_gateway
from tests.support.upstream import Upstream, running_upstream

MAINTENANCE_MESSAGE = "Basketball is being upgraded; back at noon."

API = """
products:
  soccer:
    upstream: {{url: "{upstream}/base"}}
    routes:
      - path: /soccer/v4/{{lang}}/info.json
        methods: [GET]
        params:
          lang: {{enum: [en, de]}}
      - path: /soccer/v4/competitions/{{competition_id}}/info.json
        params:
          competition_id: {{pattern: "sr:competition:[0-9]+"}}
      - path: /soccer/retired
        gone: true
  basket:
    upstream: {{url: "{upstream}/base"}}
    maintenance: {{retry_after: 120, message: "{maintenance}"}}
    routes:
      - path: /basket/{{rest:path}}
  hockey:
    upstream: {{url: "{upstream}/base"}}
    routes:
      - path: /hockey/{{rest:path}}
plans:
  standard:
    rate: {{limit: 10, per: second}}
    quota: {{limit: 1000, per: day}}
  two-a-day:
    quota: {{limit: 2, per: day}}
  three-a-day:
    quota: {{limit: 3, per: day}}
  strict:
    rate: {{limit: 1, per: 500ms}}
    quota: {{limit: 2, per: day}}
  one-per-5s:
    rate: {{limit: 1, per: 5s}}
  kathmandu-day:
    quota: {{limit: 1, per: day, timezone: Asia/Kathmandu}}
  new-york-week:
    quota: {{limit: 1, per: week, timezone: America/New_York}}
  berlin-month:
    quota: {{limit: 1, per: month, timezone: Europe/Berlin}}
keys:
{keys}
"""

# name -> (plans, disabled); the name and the secret get the test's suffix.
KEYS: dict[str, tuple[str, bool]] = {
    "standard": ("{soccer: standard}", False),
    "two": ("{soccer: two-a-day, basket: two-a-day}", False),
    "three": ("{soccer: three-a-day}", False),
    "strict": ("{soccer: strict}", False),
    "slow": ("{soccer: one-per-5s}", False),
    "day": ("{soccer: kathmandu-day}", False),
    "week": ("{soccer: new-york-week}", False),
    "month": ("{soccer: berlin-month}", False),
    "disabled": ("{soccer: standard}", True),
}

INFO = "/soccer/v4/en/info.json"
LIMIT_HEADERS = (
    "RateLimit-Policy",
    "RateLimit",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "X-Quota-Limit",
    "X-Quota-Remaining",
    "X-Quota-Reset",
)
UTC = ZoneInfo("UTC")


def has_limit_headers(answer: Answer) -> bool:
    return any(name in answer.headers for name in LIMIT_HEADERS)


@dataclass
class Api:
    """The proxy and admin ports of one gateway, and the keys of this test."""

    session: aiohttp.ClientSession
    proxy: str
    admin: str
    suffix: str
    upstream: Upstream

    def secret(self, key: str) -> str:
        return f"{key}-secret-{self.suffix}"

    def name(self, key: str) -> str:
        return f"{key}-{self.suffix}"

    async def get(self, path: str, key: str | None = "standard", method: str = "GET") -> Answer:
        headers = {"X-API-Key": self.secret(key)} if key is not None else {}
        async with self.session.request(method, self.proxy + path, headers=headers) as response:
            return await _answer(response)

    async def usage(self, key: str) -> dict[str, Any]:
        async with self.session.get(f"{self.admin}/admin/usage/{self.name(key)}") as response:
            assert response.status == 200
            body: dict[str, Any] = await response.json()
            return body

    async def quota_used(self, key: str, product: str = "soccer") -> int:
        used: int = (await self.usage(key))["products"][product]["quota"]["used"]
        return used

    async def reset(self, key: str, product: str = "soccer") -> int:
        url = f"{self.admin}/admin/usage/{self.name(key)}/{product}"
        async with self.session.delete(url) as response:
            return response.status


async def _answer(response: aiohttp.ClientResponse) -> Answer:
    answer = Answer(response.status, response.headers, await response.read())
    if problem := answer.problem():
        assert problem["status"] == response.status
        assert problem["request_id"] == response.headers["X-Request-ID"]
    return answer


@pytest.fixture(params=["memory", "redis", "cluster"])
def storage_url(request: pytest.FixtureRequest) -> str:
    # Asked for lazily, so `-k memory` starts no Redis.
    if request.param == "redis":
        return str(request.getfixturevalue("redis_server").url)
    if request.param == "cluster":
        return str(request.getfixturevalue("redis_cluster").url)
    return "memory://"


@pytest.fixture
async def api(tmp_path: Path, storage_url: str) -> AsyncIterator[Api]:
    suffix = uuid.uuid4().hex[:10]
    keys = "\n".join(
        f"  - {{name: {name}-{suffix}, key: {name}-secret-{suffix}, plans: {plans}, "
        f"disabled: {str(disabled).lower()}}}"
        for name, (plans, disabled) in KEYS.items()
    )
    async with running_upstream() as upstream:
        body = API.format(upstream=upstream.url, maintenance=MAINTENANCE_MESSAGE, keys=keys)
        # A storage timeout that a busy machine never reaches: failures are another file's.
        config = write_config(
            tmp_path / "config",
            body,
            server=worker_server_yaml(storage_url=storage_url, storage_timeout="2s"),
        )
        async with running_gateway(config) as worker, aiohttp.ClientSession() as session:
            yield Api(
                session,
                f"http://127.0.0.1:{worker.proxy_port}",
                f"http://127.0.0.1:{worker.admin_port}",
                suffix,
                upstream,
            )


# --- what the headers should say, computed here rather than taken from the gateway --------


def period_bounds(per: str, tz: ZoneInfo, now: float) -> tuple[float, float]:
    """Start and end (unix times) of the calendar day, week (from Monday) or month of `now`."""
    today = datetime.fromtimestamp(now, tz).date()
    if per == "day":
        first, following = today, today + timedelta(days=1)
    elif per == "week":
        first = today - timedelta(days=today.weekday())
        following = first + timedelta(days=7)
    else:
        first = today.replace(day=1)
        following = date(first.year + first.month // 12, first.month % 12 + 1, 1)

    def midnight(day: date) -> float:
        return datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()

    return midnight(first), midnight(following)


def live_fields(header: str) -> dict[str, tuple[int, int]]:
    """`"rate";r=9;t=1, "quota";r=999;t=3600` -> {"rate": (9, 1), "quota": (999, 3600)}."""
    items = [item.strip() for item in header.split(",")]
    parsed = [re.fullmatch(r'"(\w+)";r=(\d+);t=(\d+)', item) for item in items]
    assert all(parsed), header
    return {m[1]: (int(m[2]), int(m[3])) for m in parsed if m}


def close_to(measured: str | int, expected: float, slack: float = 2.0) -> bool:
    return abs(int(measured) - expected) <= slack


# --- 2 and 3: keys --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "detail"),
    [(None, "API key is required"), ("nobody", "not valid")],
)
async def test_401_without_a_known_key(api: Api, key: str | None, detail: str) -> None:
    answer = await api.get(INFO, key=key)
    assert answer.status == 401
    assert (answer.problem()["title"], answer.code) == ("Unauthorized", "unauthorized")
    assert detail in answer.problem()["detail"]
    assert not has_limit_headers(answer)
    assert "Retry-After" not in answer.headers
    assert api.upstream.seen == []


async def test_401_for_an_unknown_key_in_the_query(api: Api) -> None:
    answer = await api.get(INFO + "?api_key=not-a-key", key=None)
    assert (answer.status, answer.code) == (401, "unauthorized")
    assert not has_limit_headers(answer)


async def test_key_in_the_query_is_accepted_and_not_forwarded(api: Api) -> None:
    path = f"{INFO}?x=1&api_key={api.secret('standard')}&y=2"
    answer = await api.get(path, key=None)
    assert answer.status == 200
    assert answer.headers["X-Quota-Remaining"] == "999"
    (seen,) = api.upstream.seen
    assert seen.path_qs == f"/base{INFO}?x=1&y=2"
    assert api.secret("standard") not in json.dumps(seen.headers)


@pytest.mark.parametrize(
    ("key", "path", "detail"),
    [("disabled", INFO, "disabled"), ("standard", "/hockey/v1/games", "no plan")],
)
async def test_403_disabled_key_or_no_plan_for_the_product(
    api: Api, key: str, path: str, detail: str
) -> None:
    answer = await api.get(path, key=key)
    assert answer.status == 403
    assert (answer.problem()["title"], answer.code) == ("Forbidden", "forbidden")
    assert detail in answer.problem()["detail"]
    assert not has_limit_headers(answer)
    assert "Retry-After" not in answer.headers
    assert api.upstream.seen == []


# --- 5: maintenance -------------------------------------------------------------------


async def test_maintenance_is_503_with_retry_after_and_the_message(api: Api) -> None:
    answer = await api.get("/basket/v1/games", key="two")
    assert answer.status == 503
    assert (answer.problem()["title"], answer.code) == ("Service Unavailable", "maintenance")
    assert answer.problem()["detail"] == MAINTENANCE_MESSAGE
    assert answer.headers["Retry-After"] == "120"
    assert not has_limit_headers(answer)  # it stopped before the limits
    assert api.upstream.seen == []
    assert await api.quota_used("two", "basket") == 0


# --- nothing before step 7 counts -----------------------------------------------------


async def test_nothing_that_fails_before_the_limits_uses_quota(api: Api) -> None:
    failing = [
        ("/soccer/v4/xx/info.json", "GET", 400),  # lang not in its enum
        ("/soccer/v4/competitions/sr:team:1/info.json", "GET", 404),  # wrong identifier
        (INFO, "POST", 405),
        ("/soccer/retired", "GET", 410),
        ("/soccer/nowhere", "GET", 404),
    ]
    for path, method, status in failing * 3:
        answer = await api.get(path, key="two", method=method)
        assert answer.status == status, (path, method)
        assert not has_limit_headers(answer), (path, method)
        assert "Retry-After" not in answer.headers
    for _ in range(3):
        assert (await api.get("/basket/v1/games", key="two")).status == 503
    assert api.upstream.seen == []
    assert await api.quota_used("two") == 0

    # The whole quota of 2 is still there.
    assert [(await api.get(INFO, key="two")).status for _ in range(2)] == [200, 200]
    refused = await api.get(INFO, key="two")
    assert (refused.status, refused.code) == (429, "quota_exceeded")
    assert await api.quota_used("two") == 2


# --- 7: the limits and their headers --------------------------------------------------


async def test_admitted_and_throttled_answers_carry_the_limit_headers(api: Api) -> None:
    answers = [await api.get(INFO) for _ in range(11)]
    now = time.time()
    day_start, day_end = period_bounds("day", UTC, now)
    until_midnight = day_end - now

    policy = f'"rate";q=10;w=1, "quota";q=1000;w={math.ceil(day_end - day_start)}'
    for used, answer in enumerate(answers[:10], start=1):
        assert answer.status == 200
        assert answer.headers["RateLimit-Policy"] == policy
        live = live_fields(answer.headers["RateLimit"])
        assert live["rate"] == (10 - used, 1)
        assert live["quota"][0] == 1000 - used
        assert close_to(live["quota"][1], until_midnight)
        assert answer.headers["X-RateLimit-Limit"] == "10"
        assert answer.headers["X-RateLimit-Remaining"] == str(10 - used)
        assert answer.headers["X-RateLimit-Reset"] == "1"
        assert answer.headers["X-Quota-Limit"] == "1000"
        assert answer.headers["X-Quota-Remaining"] == str(1000 - used)
        assert close_to(answer.headers["X-Quota-Reset"], until_midnight)
        assert "Retry-After" not in answer.headers

    throttled = answers[10]
    assert throttled.status == 429
    assert (throttled.problem()["title"], throttled.code) == ("Throttled", "throttled")
    assert throttled.headers["Retry-After"] == "1"
    assert throttled.headers["RateLimit-Policy"] == policy
    live = live_fields(throttled.headers["RateLimit"])
    assert live["rate"] == (0, 1)
    assert live["quota"][0] == 990  # the throttled request used no quota
    assert throttled.headers["X-RateLimit-Remaining"] == "0"
    assert throttled.headers["X-Quota-Remaining"] == "990"
    assert len(api.upstream.seen) == 10


async def test_throttled_retry_after_is_the_time_until_one_more_is_admitted(api: Api) -> None:
    assert (await api.get(INFO, key="slow")).status == 200
    throttled = await api.get(INFO, key="slow")
    assert (throttled.status, throttled.code) == (429, "throttled")
    # The one admission leaves the 5 s window a little under 5 s from now: 5 whole seconds.
    assert throttled.headers["Retry-After"] == "5"
    assert throttled.headers["X-RateLimit-Reset"] == "5"
    # A plan without a quota has only the rate policy and no X-Quota-* headers.
    assert throttled.headers["RateLimit-Policy"] == '"rate";q=1;w=5'
    assert throttled.headers["RateLimit"] == '"rate";r=0;t=5'
    assert not any(name.startswith("X-Quota-") for name in throttled.headers)


@pytest.mark.parametrize(
    ("key", "per", "zone"),
    [
        ("day", "day", "Asia/Kathmandu"),
        ("week", "week", "America/New_York"),
        ("month", "month", "Europe/Berlin"),
    ],
)
async def test_quota_exceeded_retry_after_is_the_end_of_the_period(
    api: Api, key: str, per: str, zone: str
) -> None:
    assert (await api.get(INFO, key=key)).status == 200
    refused = await api.get(INFO, key=key)
    now = time.time()
    start, end = period_bounds(per, ZoneInfo(zone), now)

    assert refused.status == 429
    assert (refused.problem()["title"], refused.code) == ("Quota Exceeded", "quota_exceeded")
    assert close_to(refused.headers["Retry-After"], end - now)
    assert close_to(refused.headers["X-Quota-Reset"], end - now)
    assert refused.headers["X-Quota-Limit"] == "1"
    assert refused.headers["X-Quota-Remaining"] == "0"
    assert refused.headers["RateLimit-Policy"] == f'"quota";q=1;w={math.ceil(end - start)}'
    live = live_fields(refused.headers["RateLimit"])
    assert live["quota"][0] == 0 and close_to(live["quota"][1], end - now)
    assert "X-RateLimit-Limit" not in refused.headers
    usage = (await api.usage(key))["products"]["soccer"]["quota"]
    assert close_to(usage["reset_seconds"], end - now)
    assert len(api.upstream.seen) == 1


async def test_quota_wins_over_rate_and_rejected_requests_consume_nothing(api: Api) -> None:
    # strict: 1 per 500 ms, 2 a day.
    assert (await api.get(INFO, key="strict")).status == 200
    throttled = await api.get(INFO, key="strict")
    assert (throttled.status, throttled.code) == (429, "throttled")
    assert throttled.headers["X-Quota-Remaining"] == "1"  # no quota used by the throttle
    assert await api.quota_used("strict") == 1

    await asyncio.sleep(0.55)  # the first admission has left the window
    second = await api.get(INFO, key="strict")
    assert second.status == 200
    second_answered = time.monotonic()

    # Over the rate (the second admission is in the window) and over the quota: quota wins.
    both = await api.get(INFO, key="strict")
    assert (both.status, both.code) == (429, "quota_exceeded")
    assert int(both.headers["Retry-After"]) > 60  # the end of the day, not the rate's second
    await asyncio.sleep(0.25)
    later = await api.get(INFO, key="strict")
    assert (later.status, later.code) == (429, "quota_exceeded")
    assert await api.quota_used("strict") == 2

    # With the quota back, the rate window holds only the second admission: had the refused
    # requests been counted, the one sent 250 ms after it would still be in the window now.
    assert await api.reset("strict") == 204
    await asyncio.sleep(max(0.0, second_answered + 0.55 - time.monotonic()))
    assert (await api.get(INFO, key="strict")).status == 200
    assert len(api.upstream.seen) == 3


# --- the admin port ------------------------------------------------------------------


async def test_admin_usage_follows_real_requests_and_delete_restores_admission(
    api: Api,
) -> None:
    before = await api.usage("three")
    assert before["key"] == api.name("three")
    assert before["products"]["soccer"]["quota"]["used"] == 0

    for used in range(1, 4):
        assert (await api.get(INFO, key="three")).status == 200
        quota = (await api.usage("three"))["products"]["soccer"]["quota"]
        assert (quota["limit"], quota["used"], quota["remaining"]) == (3, used, 3 - used)
    refused = await api.get(INFO, key="three")
    assert (refused.status, refused.code) == (429, "quota_exceeded")
    assert await api.quota_used("three") == 3  # the refusal used nothing

    assert await api.reset("three") == 204
    assert await api.quota_used("three") == 0
    assert (await api.get(INFO, key="three")).status == 200
    assert await api.quota_used("three") == 1
    assert len(api.upstream.seen) == 4
