"""Instants as written in the YAML or the admin API: RFC 3339 times such as `expires`.

A time must say its offset (`Z` or `+02:00`): a key that expires at a different hour depending
on where the gateway runs is a surprise nobody wants. A bare date means its midnight in UTC.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime

INSTANT_HINT = "must be an RFC 3339 time with an offset, like 2027-01-01T00:00:00Z"


def parse_instant(value: object) -> float:
    """The unix time of `value` (text, or what YAML made of an unquoted time); ValueError if
    it is not one."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day, tzinfo=UTC)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
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
    seconds = moment.timestamp()
    if not math.isfinite(seconds):
        raise ValueError(INSTANT_HINT)
    return seconds


def format_instant(unix_time: float) -> str:
    """`2027-01-01T00:00:00Z`: whole seconds, UTC, as the admin API shows every time."""
    moment = datetime.fromtimestamp(unix_time, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
