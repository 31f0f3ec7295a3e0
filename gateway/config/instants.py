"""Instants as written in the YAML or the admin API: RFC 3339 times such as `expires`.

A time must say its offset (`Z` or `+02:00`): a key that expires at a different hour depending
on where the gateway runs is a surprise nobody wants. A bare date means its midnight in UTC.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, date, datetime

INSTANT_HINT = "must be an RFC 3339 time with an offset, like 2027-01-01T00:00:00Z"
# RFC 3339's date-time (section 5.6), or a bare full-date.
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"([Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2}))?"
)
# The instants every part of the gateway can show and compare (a datetime ends in year 9999).
EARLIEST = 0.0
LATEST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()
RANGE_HINT = "must be between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59Z"


def parse_instant(value: object) -> float:
    """The unix time of `value` (text, or what YAML made of an unquoted time); ValueError if
    it is not one."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day, tzinfo=UTC)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        if _RFC3339.fullmatch(text) is None:
            # fromisoformat alone takes more of ISO 8601: week dates (`2027-W01-1`), the basic
            # format (`20270101T000000Z`), offsets like `+02` or `+0200`.
            raise ValueError(INSTANT_HINT)
        try:
            if len(text) == 10:
                parsed_date = date.fromisoformat(text)
                moment = datetime(parsed_date.year, parsed_date.month, parsed_date.day, tzinfo=UTC)
            else:
                # RFC 3339 allows a lower-case `t`/`z` and a space for the `T`.
                moment = datetime.fromisoformat(text.upper())
        except ValueError:
            raise ValueError(INSTANT_HINT) from None
    else:
        raise ValueError(INSTANT_HINT)
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(INSTANT_HINT)
    try:
        seconds = moment.timestamp()
    except (OverflowError, ValueError):  # 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise ValueError(RANGE_HINT) from None
    if not math.isfinite(seconds):
        raise ValueError(INSTANT_HINT)
    if not EARLIEST <= seconds <= LATEST:
        raise ValueError(RANGE_HINT)
    return seconds


def format_instant(unix_time: float) -> str:
    """`2027-01-01T00:00:00Z`: whole seconds, UTC, as the admin API shows every time."""
    # Clamped: a time stored before the range was enforced must not make every listing fail.
    moment = datetime.fromtimestamp(min(max(unix_time, EARLIEST), LATEST), UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
