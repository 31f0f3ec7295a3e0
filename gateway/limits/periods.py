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
