"""Calendar quota periods, checked against instants worked out by hand."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import pytest

from gateway.config.model import QUOTA_PERIODS, QuotaPeriod
from gateway.limits.periods import quota_period
from tests.support.instants import HOUR, utc

UTC_ZONE = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
SANTIAGO = ZoneInfo("America/Santiago")


@pytest.mark.parametrize(
    ("now", "per", "start", "end"),
    [
        (
            utc(2024, 3, 15, 12, 34, 56),
            "second",
            utc(2024, 3, 15, 12, 34, 56),
            utc(2024, 3, 15, 12, 34, 57),
        ),
        (
            utc(2024, 3, 15, 12, 34, 56) + 0.75,
            "second",
            utc(2024, 3, 15, 12, 34, 56),
            utc(2024, 3, 15, 12, 34, 57),
        ),
        (
            utc(2024, 3, 15, 12, 34, 56),
            "minute",
            utc(2024, 3, 15, 12, 34),
            utc(2024, 3, 15, 12, 35),
        ),
        (utc(2024, 3, 15, 12, 34, 56), "hour", utc(2024, 3, 15, 12), utc(2024, 3, 15, 13)),
        (utc(2024, 3, 15, 12, 34, 56), "day", utc(2024, 3, 15), utc(2024, 3, 16)),
        (utc(2024, 3, 16), "day", utc(2024, 3, 16), utc(2024, 3, 17)),
        (utc(2024, 3, 15, 23, 59, 59), "day", utc(2024, 3, 15), utc(2024, 3, 16)),
        # 2024-03-17 is a Sunday: its week began on Monday the 11th.
        (utc(2024, 3, 17, 23, 59, 59), "week", utc(2024, 3, 11), utc(2024, 3, 18)),
        (utc(2024, 3, 18), "week", utc(2024, 3, 18), utc(2024, 3, 25)),
        # A week across a month and a year boundary.
        (utc(2025, 1, 1, 8), "week", utc(2024, 12, 30), utc(2025, 1, 6)),
        (utc(2024, 2, 29, 18), "month", utc(2024, 2, 1), utc(2024, 3, 1)),
        (utc(2024, 12, 31, 23, 59, 59), "month", utc(2024, 12, 1), utc(2025, 1, 1)),
        (utc(2025, 1, 1), "month", utc(2025, 1, 1), utc(2025, 2, 1)),
    ],
)
def test_utc_periods(now: float, per: QuotaPeriod, start: float, end: float) -> None:
    assert quota_period(now, per, UTC_ZONE) == (start, end)


@pytest.mark.parametrize(
    ("now", "per", "start", "end"),
    [
        # 23:30 UTC on Jan 1 is already 00:30 on Jan 2 in Berlin (CET, +1).
        (utc(2024, 1, 1, 23, 30), "day", utc(2024, 1, 1, 23), utc(2024, 1, 2, 23)),
        (utc(2024, 1, 31, 23, 30), "month", utc(2024, 1, 31, 23), utc(2024, 2, 29, 23)),
        # March change: 2024-03-31 02:00 CET becomes 03:00 CEST; that day lasts 23 hours.
        (utc(2024, 3, 31, 12), "day", utc(2024, 3, 30, 23), utc(2024, 3, 31, 22)),
        (utc(2024, 3, 30, 23), "day", utc(2024, 3, 30, 23), utc(2024, 3, 31, 22)),
        (utc(2024, 3, 31, 22), "day", utc(2024, 3, 31, 22), utc(2024, 4, 1, 22)),
        (utc(2024, 3, 31, 12), "week", utc(2024, 3, 24, 23), utc(2024, 3, 31, 22)),
        (utc(2024, 3, 31, 12), "month", utc(2024, 2, 29, 23), utc(2024, 3, 31, 22)),
        # 01:59:59 CET is the last second before the jump; 03:00 CEST the first after.
        (utc(2024, 3, 31, 0, 59, 59), "hour", utc(2024, 3, 31, 0), utc(2024, 3, 31, 1)),
        (utc(2024, 3, 31, 1), "hour", utc(2024, 3, 31, 1), utc(2024, 3, 31, 2)),
        # October change: 2024-10-27 03:00 CEST becomes 02:00 CET; that day lasts 25 hours.
        (utc(2024, 10, 27, 12), "day", utc(2024, 10, 26, 22), utc(2024, 10, 27, 23)),
        (utc(2024, 10, 27, 12), "week", utc(2024, 10, 20, 22), utc(2024, 10, 27, 23)),
        (utc(2024, 10, 27, 12), "month", utc(2024, 9, 30, 22), utc(2024, 10, 31, 23)),
        # The hour 02:00-03:00 happens twice: once in CEST, once in CET.
        (utc(2024, 10, 27, 0, 30), "hour", utc(2024, 10, 27, 0), utc(2024, 10, 27, 1)),
        (utc(2024, 10, 27, 1, 30), "hour", utc(2024, 10, 27, 1), utc(2024, 10, 27, 2)),
        (
            utc(2024, 10, 27, 1, 30, 15),
            "minute",
            utc(2024, 10, 27, 1, 30),
            utc(2024, 10, 27, 1, 31),
        ),
    ],
)
def test_berlin_periods(now: float, per: QuotaPeriod, start: float, end: float) -> None:
    assert quota_period(now, per, BERLIN) == (start, end)


@pytest.mark.parametrize(
    ("now", "per", "start", "end"),
    [
        # 03:00 UTC on Mar 1 is still Feb 29, 22:00 EST (-5).
        (utc(2024, 3, 1, 3), "month", utc(2024, 2, 1, 5), utc(2024, 3, 1, 5)),
        (utc(2024, 3, 1, 3), "day", utc(2024, 2, 29, 5), utc(2024, 3, 1, 5)),
        # 2024-03-10 02:00 EST becomes 03:00 EDT: 23 hours.
        (utc(2024, 3, 10, 12), "day", utc(2024, 3, 10, 5), utc(2024, 3, 11, 4)),
        (utc(2024, 3, 10, 12), "week", utc(2024, 3, 4, 5), utc(2024, 3, 11, 4)),
        # 2024-11-03 02:00 EDT becomes 01:00 EST: 25 hours.
        (utc(2024, 11, 3, 12), "day", utc(2024, 11, 3, 4), utc(2024, 11, 4, 5)),
        (utc(2024, 11, 3, 12), "month", utc(2024, 11, 1, 4), utc(2024, 12, 1, 5)),
    ],
)
def test_new_york_periods(now: float, per: QuotaPeriod, start: float, end: float) -> None:
    assert quota_period(now, per, NEW_YORK) == (start, end)


def test_day_whose_midnight_is_skipped_starts_at_the_jump() -> None:
    # Chile moved its clocks from 2023-09-03 00:00 (-04) to 01:00 (-03): there was no
    # local midnight, and the day began at 04:00 UTC.
    assert quota_period(utc(2023, 9, 3, 12), "day", SANTIAGO) == (
        utc(2023, 9, 3, 4),
        utc(2023, 9, 4, 3),
    )


@pytest.mark.parametrize("zone", [UTC_ZONE, BERLIN, NEW_YORK, SANTIAGO, ZoneInfo("Asia/Kolkata")])
@pytest.mark.parametrize("per", QUOTA_PERIODS)
def test_periods_contain_now_and_follow_each_other(zone: ZoneInfo, per: QuotaPeriod) -> None:
    # Every 7h13m over a year: each period holds its instant and the next begins at its end.
    now = utc(2024, 1, 1)
    while now < utc(2025, 1, 1):
        start, end = quota_period(now, per, zone)
        assert start <= now < end
        assert quota_period(end, per, zone)[0] == end
        now += 7 * HOUR + 13 * 60 + 0.5
