"""The quota period cache: the same answers as computing each time, at a fraction of the cost."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import pytest

from gateway.config.model import QUOTA_PERIODS, QuotaPeriod, QuotaRule
from gateway.limits.memory import MemoryLimiter
from gateway.limits.periods import PeriodCache, quota_period
from tests.support.instants import HOUR, utc

BERLIN = ZoneInfo("Europe/Berlin")


def test_a_period_is_reused_until_it_ends_then_the_next_one_is_computed() -> None:
    cache = PeriodCache()
    first = cache.period(utc(2024, 3, 15, 12), "day", BERLIN)
    assert first == (utc(2024, 3, 14, 23), utc(2024, 3, 15, 23))
    assert cache.period(utc(2024, 3, 15, 22, 59) + 59.999, "day", BERLIN) is first
    assert cache.period(first[1], "day", BERLIN) == (utc(2024, 3, 15, 23), utc(2024, 3, 16, 23))


def test_a_clock_that_goes_back_gets_the_earlier_period() -> None:
    cache = PeriodCache()
    cache.period(utc(2024, 3, 15, 12), "hour", BERLIN)
    assert cache.period(utc(2024, 3, 15, 11, 30), "hour", BERLIN) == (
        utc(2024, 3, 15, 11),
        utc(2024, 3, 15, 12),
    )


def test_kinds_and_timezones_are_cached_apart() -> None:
    cache = PeriodCache()
    now = utc(2024, 3, 15, 23, 30)
    assert cache.period(now, "day", BERLIN) == (utc(2024, 3, 15, 23), utc(2024, 3, 16, 23))
    assert cache.period(now, "day", ZoneInfo("UTC")) == (utc(2024, 3, 15), utc(2024, 3, 16))
    assert cache.period(now, "month", BERLIN) == (utc(2024, 2, 29, 23), utc(2024, 3, 31, 22))


def test_the_days_the_clocks_change_keep_their_length() -> None:
    cache = PeriodCache()
    # 2024-03-31 lasts 23 hours in Berlin, 2024-10-27 25 hours; the days around them 24.
    lengths = []
    now = utc(2024, 3, 30, 12)
    for _ in range(3):
        start, end = cache.period(now, "day", BERLIN)
        lengths.append((end - start) / HOUR)
        now = end
    now = utc(2024, 10, 26, 12)
    for _ in range(3):
        start, end = cache.period(now, "day", BERLIN)
        lengths.append((end - start) / HOUR)
        now = end
    assert lengths == [24, 23, 24, 24, 25, 24]


@pytest.mark.parametrize(
    "zone", ["Europe/Berlin", "America/New_York", "America/Santiago", "Australia/Lord_Howe"]
)
@pytest.mark.parametrize("per", QUOTA_PERIODS)
def test_every_answer_equals_the_computed_one(zone: str, per: QuotaPeriod) -> None:
    # Across the clock changes of 2024 (Lord Howe moves by half an hour), every 41 minutes
    # and a bit, and at each period's last instant and end, so the clock also goes back.
    tz = ZoneInfo(zone)
    cache = PeriodCache()
    now = utc(2024, 1, 1)
    while now < utc(2025, 1, 1):
        start, end = cache.period(now, per, tz)
        assert (start, end) == quota_period(now, per, tz)
        assert cache.period(end - 0.001, per, tz) == quota_period(end - 0.001, per, tz)
        assert cache.period(end, per, tz) == quota_period(end, per, tz)
        now += 41 * 60 + 0.25


def test_a_period_is_not_reused_before_the_instant_it_was_computed_at() -> None:
    # Lord Howe went from +11 to +10:30 at 15:00 UTC on 2024-04-06: the hour computed just
    # after that began at 14:30, yet at 14:45 the hour in force still began at 14:00.
    lord_howe = ZoneInfo("Australia/Lord_Howe")
    cache = PeriodCache()
    assert cache.period(utc(2024, 4, 6, 15, 10), "hour", lord_howe) == (
        utc(2024, 4, 6, 14, 30),
        utc(2024, 4, 6, 15, 30),
    )
    assert cache.period(utc(2024, 4, 6, 14, 45), "hour", lord_howe) == (
        utc(2024, 4, 6, 14),
        utc(2024, 4, 6, 15),
    )


async def test_memory_limiter_starts_the_next_day_at_its_end_on_a_moved_clock() -> None:
    now = utc(2024, 3, 31, 21)  # 23:00 CEST, the last hour of a 23-hour day
    limiter = MemoryLimiter(clock=lambda: now)
    quota = QuotaRule(limit=1, per="day", timezone=BERLIN)
    first = await limiter.hit("k:p", None, quota)
    assert first.allowed and first.quota is not None and first.quota.window == 23 * HOUR
    now = utc(2024, 3, 31, 21, 59) + 59.999
    assert (await limiter.hit("k:p", None, quota)).outcome == "quota_exceeded"
    now = utc(2024, 3, 31, 22)  # midnight: a new day of 24 hours
    after = await limiter.hit("k:p", None, quota)
    assert after.allowed and after.quota is not None
    assert (after.quota.window, after.quota.reset) == (24 * HOUR, 24 * HOUR)
