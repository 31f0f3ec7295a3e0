"""Quotas of different period kinds on one subscription, at an instant where their periods
all begin together: each kind keeps a count of its own (README "History": a plan counting
another period has a count of its own), on memory, a real redis-server and a Redis Cluster.

The gateway's clock is set to Monday 2027-02-01 00:30 UTC, where a month, a week, a day and
an hour all began at midnight; Redis keeps its own clock, as with a gateway whose clock is off.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from gateway.config.model import QuotaPeriod, QuotaRule
from gateway.limits import Limiter
from gateway.limits.memory import MemoryLimiter
from gateway.limits.periods import quota_period
from gateway.limits.redis import RedisLimiter
from gateway.limits.redis_clients import open_storage_redis
from tests.support.metering_quotas import REFUND_5XX, new_key

# Monday, the first of a month, half an hour into its first hour.
NOW = datetime(2027, 2, 1, 0, 30, tzinfo=UTC).timestamp()
KINDS: tuple[QuotaPeriod, ...] = ("month", "week", "day", "hour")


@pytest.fixture(params=["memory", "redis", "cluster"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[Limiter]:
    made: Limiter
    if request.param == "memory":
        made = MemoryLimiter(clock=lambda: NOW)
    else:
        fixture = "redis_server" if request.param == "redis" else "redis_cluster"
        url = request.getfixturevalue(fixture).url
        made = RedisLimiter(open_storage_redis(url, 2.0), 2.0, clock=lambda: NOW)
    yield made
    await made.close()


def rule(per: QuotaPeriod) -> QuotaRule:
    return QuotaRule(100, per, ZoneInfo("UTC"), REFUND_5XX)  # type: ignore[arg-type]


async def test_periods_that_begin_together_count_apart(limiter: Limiter) -> None:
    """A trial on a daily quota upgraded to a monthly one on the first of the month (keys API,
    PATCH): the two shared one counter, so the month began with the day's use and, on Redis,
    vanished with the day's counter a minute after the day ended, and admitted its whole limit
    once more."""
    subject = f"{new_key()}:soccer"
    receipts = {}
    for uses, per in enumerate(KINDS, start=1):
        for _ in range(uses):
            decision = await limiter.hit(subject, None, rule(per), 1, "pro", settles=True)
            assert decision.allowed and decision.quota is not None
            receipts[per] = decision.receipt
        # Its own period in the headers: its remaining units, its end and its length.
        start, end = quota_period(NOW, per, ZoneInfo("UTC"))
        assert (decision.quota.remaining, decision.quota.reset) == (100 - uses, end - NOW)
        assert decision.quota.window == end - start
    assert [(await limiter.usage(subject, rule(per))).used for per in KINDS] == [1, 2, 3, 4]

    # Refunds, credit and resets touch their own kind's counter alone.
    for per in KINDS:
        receipt = receipts[per]
        assert receipt is not None
        assert await limiter.refund(subject, receipt) == 1
    await limiter.credit(subject, rule("week"), 7)
    await limiter.reset_quota(subject, rule("day"))
    usages = [await limiter.usage(subject, rule(per)) for per in KINDS]
    assert [(usage.used, usage.credit) for usage in usages] == [(0, 0), (1, 7), (0, 0), (3, 0)]
