"""The UTC day boundary of the usage history, in the storages themselves (memory, a real
redis-server, a real Redis Cluster): what the billing export counts for the requests on either
side of midnight, and where the refund of one admitted before it and settled after it goes.

The gateway decides a request's day by its own clock (the one the limiter is given), so the
tests give the limiter a clock set just before and just after today's midnight: Redis and its
expiries stay real (yesterday's history is kept 400 more days, so nothing expires meanwhile).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from zoneinfo import ZoneInfo

import pytest

from gateway.config.model import QuotaRule
from gateway.limits.base import DAY_SECONDS, DayUsage, Limiter, day_of
from gateway.limits.memory import MemoryLimiter
from gateway.limits.redis import RedisLimiter
from gateway.limits.redis_clients import open_storage_redis

# A daily quota: its period ends at the same midnight as the history's day.
DAILY = QuotaRule(100, "day", ZoneInfo("UTC"), frozenset({"5xx"}))  # type: ignore[arg-type]

MakeLimiter = Callable[[Callable[[], float]], Limiter]


@pytest.fixture(params=["memory", "redis", "cluster"])
async def make_limiter(request: pytest.FixtureRequest) -> AsyncIterator[MakeLimiter]:
    made: list[Limiter] = []

    def make(clock: Callable[[], float]) -> Limiter:
        limiter: Limiter
        if request.param == "memory":
            limiter = MemoryLimiter(clock=clock)
        else:
            fixture = "redis_server" if request.param == "redis" else "redis_cluster"
            server = request.getfixturevalue(fixture)
            limiter = RedisLimiter(open_storage_redis(server.url, 2.0), 2.0, clock=clock)
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.close()


async def test_a_request_just_before_midnight_is_billed_on_its_day_and_refunded_there(
    make_limiter: MakeLimiter,
) -> None:
    today = day_of(time.time())
    midnight = today * DAY_SECONDS
    now = [midnight - 0.1]  # 23:59:59.9 UTC yesterday
    limiter = make_limiter(lambda: now[0])
    key = f"midnight-{uuid.uuid4().hex[:10]}"
    subject = f"{key}:soccer"

    late = [await limiter.hit(subject, None, DAILY, 3, "pro", settles=True) for _ in range(2)]
    now[0] = midnight + 0.2  # 00:00:00.2 UTC today
    early = await limiter.hit(subject, None, DAILY, 3, "pro", settles=True)
    # The first late request's answer was a 5xx, known only after midnight.
    assert late[0].receipt is not None
    await limiter.refund(subject, late[0].receipt)

    assert all(d.allowed for d in (*late, early))
    yesterday_line = DayUsage(today - 1, subject, "pro", 2, 3)
    today_line = DayUsage(today, subject, "pro", 1, 3)
    assert await limiter.history(key, today - 1, today) == [yesterday_line, today_line]
    assert await limiter.history(key, today, today) == [today_line]
    assert await limiter.history(key, today - 1, today - 1) == [yesterday_line]
    exported = [
        line
        async for batch in limiter.export(today - 1, today)
        for line in batch
        if line.subject == subject
    ]
    assert exported == [yesterday_line, today_line]
    # Today's quota holds today's request alone: the refund went to yesterday's period.
    usage = await limiter.usage(subject, DAILY)
    assert (usage.used, usage.reset_at) == (3, midnight + DAY_SECONDS)
