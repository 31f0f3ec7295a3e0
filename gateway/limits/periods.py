"""Calendar-aligned quota periods in a plan's timezone.

A quota resets when the local calendar says so: a "day" in Europe/Berlin starts at local
midnight and is 23 or 25 hours long on the days the clocks change. The arithmetic is done on
local wall dates and only then converted to instants, so the lengths come out right.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from gateway.config.model import QuotaPeriod

# Periods shorter than a day are fixed lengths aligned to the local offset; offsets change
# on whole hours in practice, so aligning to the offset in force keeps them on local
# boundaries without wall-clock ambiguity during a repeated hour.
_FIXED_SECONDS: dict[str, int] = {"second": 1, "minute": 60, "hour": 3600}


def quota_period(now: float, per: QuotaPeriod, tz: ZoneInfo) -> tuple[float, float]:
    """The (start, end) unix times of the period of kind `per` that contains `now`."""
    local = datetime.fromtimestamp(now, tz)
    fixed = _FIXED_SECONDS.get(per)
    if fixed is not None:
        offset = local.utcoffset()
        offset_seconds = offset.total_seconds() if offset is not None else 0.0
        start = ((now + offset_seconds) // fixed) * fixed - offset_seconds
        return start, start + fixed
    first_day, next_first_day = _calendar_days(local.date(), per)
    return _local_midnight(first_day, tz), _local_midnight(next_first_day, tz)


def _calendar_days(today: date, per: QuotaPeriod) -> tuple[date, date]:
    """The first local date of the period and the first local date of the next one."""
    if per == "day":
        return today, today + timedelta(days=1)
    if per == "week":
        monday = today - timedelta(days=today.weekday())
        return monday, monday + timedelta(days=7)
    if per == "month":
        first = today.replace(day=1)
        if first.month == 12:
            return first, first.replace(year=first.year + 1, month=1)
        return first, first.replace(month=first.month + 1)
    raise ValueError(f"unknown quota period {per!r}")


def _local_midnight(day: date, tz: ZoneInfo) -> float:
    # fold=0 picks the first of two midnights when the clocks go back over midnight, and
    # for a midnight skipped by the clocks going forward it maps to the instant of the jump,
    # which is when that local day actually begins.
    return datetime.combine(day, time(0), tzinfo=tz).timestamp()


class PeriodCache:
    """`quota_period` that keeps each answer per (kind, timezone) until its period ends.

    Working the calendar out costs microseconds on every request while the answer changes
    once a period. An answer is reused from the instant it was computed at until its period
    ends; a clock that jumps back before that instant gets a fresh computation (an offset
    change can make a period computed later begin before the instant it was asked for).
    Between the two, recomputing gave another answer only where an offset change fell
    inside a period in a way the calendar arithmetic cannot follow: checked over every zone
    from 2000 to 2040, in a handful of zones before 2019, and the cached period still
    contains the instant there.
    """

    __slots__ = ("_periods",)

    # Plans name few (kind, timezone) pairs; the bound only matters across many reloads.
    _MAX_ENTRIES = 256

    def __init__(self) -> None:
        # (kind, timezone) -> (computed at, (start, end))
        self._periods: dict[tuple[str, ZoneInfo], tuple[float, tuple[float, float]]] = {}

    def period(self, now: float, per: QuotaPeriod, tz: ZoneInfo) -> tuple[float, float]:
        """The (start, end) unix times of the period of kind `per` that contains `now`."""
        key = (per, tz)
        cached = self._periods.get(key)
        if cached is not None:
            computed_at, period = cached
            if computed_at <= now < period[1]:
                return period
        if len(self._periods) >= self._MAX_ENTRIES:
            self._periods.clear()
        period = quota_period(now, per, tz)
        self._periods[key] = (now, period)
        return period
