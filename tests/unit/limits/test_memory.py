"""The in-process limiter on a clock the test moves, for exact numbers and memory bounds."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import pytest

from gateway.config.model import QuotaRule, RateRule
from gateway.limits.memory import MemoryLimiter
from tests.support.instants import utc

START = utc(2024, 3, 31, 21, 59)  # 23:59 CEST in Berlin


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(clock: Clock) -> MemoryLimiter:
    return MemoryLimiter(clock=clock, sweep_interval=30)


async def test_rate_reset_and_retry_after_follow_the_oldest_admission(
    clock: Clock, limiter: MemoryLimiter
) -> None:
    rate = RateRule(limit=3, window=10, per="10s")
    for offset, remaining in ((0, 2), (2, 1), (5, 0)):
        clock.now = START + offset
        decision = await limiter.hit("k:p", rate, None)
        assert decision.rate is not None
        assert (decision.rate.remaining, decision.rate.reset) == (remaining, 10 - offset)

    clock.now = START + 7
    throttled = await limiter.hit("k:p", rate, None)
    assert throttled.outcome == "throttled"
    assert throttled.retry_after == 3  # the admission at START leaves at START + 10

    clock.now = START + 10  # exactly one window later: the first admission is out
    admitted = await limiter.hit("k:p", rate, None)
    assert admitted.allowed and admitted.rate is not None
    assert (admitted.rate.remaining, admitted.rate.reset) == (0, 2)


async def test_a_lowered_limit_waits_for_enough_admissions_to_leave(
    clock: Clock, limiter: MemoryLimiter
) -> None:
    for offset in range(4):
        clock.now = START + offset
        assert (await limiter.hit("k:p", RateRule(limit=4, window=10, per="10s"), None)).allowed
    # A reload lowered the limit to 2: room frees when only one admission is left, which is
    # when the third (at START + 2) leaves.
    throttled = await limiter.hit("k:p", RateRule(limit=2, window=10, per="10s"), None)
    assert throttled.outcome == "throttled"
    assert throttled.retry_after == START + 2 + 10 - clock.now


async def test_quota_resets_at_local_midnight(clock: Clock, limiter: MemoryLimiter) -> None:
    quota = QuotaRule(limit=1, per="day", timezone=ZoneInfo("Europe/Berlin"))
    assert (await limiter.hit("k:p", None, quota)).allowed
    exceeded = await limiter.hit("k:p", None, quota)
    assert exceeded.outcome == "quota_exceeded"
    assert exceeded.retry_after == 60  # 23:59 CEST -> 00:00
    assert exceeded.quota is not None and exceeded.quota.window == 23 * 3600  # DST day

    clock.now = START + 60
    fresh = await limiter.hit("k:p", None, quota)
    assert fresh.allowed and fresh.quota is not None
    assert fresh.quota.remaining == 0 and fresh.quota.window == 24 * 3600


async def test_expired_subjects_are_swept(clock: Clock, limiter: MemoryLimiter) -> None:
    rate = RateRule(limit=5, window=1, per="second")
    quota = QuotaRule(limit=5, per="minute", timezone=ZoneInfo("UTC"))
    for n in range(100):
        await limiter.hit(f"key-{n}:p", rate, quota)
    assert limiter.tracked_subjects == 100

    clock.now = START + 61  # past the sweep interval, the rate windows and the minute
    await limiter.hit("other:p", rate, quota)
    assert limiter.tracked_subjects == 1


async def test_usage_does_not_create_state(clock: Clock, limiter: MemoryLimiter) -> None:
    quota = QuotaRule(limit=5, per="month", timezone=ZoneInfo("UTC"))
    usage = await limiter.usage("nobody:p", quota)
    assert (usage.used, usage.remaining) == (0, 5)
    assert usage.reset_at == utc(2024, 4, 1)
    assert limiter.tracked_subjects == 0


async def test_a_quota_whose_period_kind_changes_and_back_keeps_what_its_period_used(
    clock: Clock, limiter: MemoryLimiter
) -> None:
    """A key's override went from a monthly quota to a daily one and back (keys API, PATCH):
    the memory storage kept one counter per subject and dropped the month's for the day's, so
    the month admitted its whole limit once more (a Redis storage keeps a counter per period)."""
    utc_zone = ZoneInfo("UTC")
    month = QuotaRule(limit=10, per="month", timezone=utc_zone)
    day = QuotaRule(limit=10, per="day", timezone=utc_zone)
    clock.now = START + 3600
    for _ in range(8):
        assert (await limiter.hit("k:p", None, month)).allowed
    assert (await limiter.hit("k:p", None, day)).allowed
    assert (await limiter.usage("k:p", month)).used == 8
    outcomes = [(await limiter.hit("k:p", None, month)).outcome for _ in range(3)]
    assert outcomes == ["allowed", "allowed", "quota_exceeded"]
    assert (await limiter.usage("k:p", month)).used == 10
    assert (await limiter.usage("k:p", day)).used == 1
