"""Durations as written in the YAML: `250ms`, `2s`, `5m`, `1h`, or a plain number of seconds."""

from __future__ import annotations

import math
import re

DURATION_HINT = "must be a duration like 250ms, 2s, 5m or 1h"

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(?P<amount>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>ms|s|m|h)?")


def parse_duration(value: object) -> float:
    """Return the duration in seconds; `ValueError` (with `DURATION_HINT`) if it is not one.

    Negative, infinite and non-numeric values are refused; zero is allowed here and left to
    the caller, since only some settings need a positive duration.
    """
    # bool is an int subclass, but `timeout: true` is a mistake, not one second.
    if isinstance(value, bool):
        raise ValueError(DURATION_HINT)
    if isinstance(value, int | float):
        seconds = float(value)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(DURATION_HINT)
        return seconds
    if not isinstance(value, str):
        raise ValueError(DURATION_HINT)
    match = _DURATION.fullmatch(value.strip())
    if match is None:
        raise ValueError(DURATION_HINT)
    return float(match["amount"]) * _UNIT_SECONDS[match["unit"] or "s"]
