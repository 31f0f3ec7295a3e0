"""Durations as written in the YAML: `250ms`, `2s`, `5m`, `1h`, several of those together
(`1h30m`, as Go and the tools built with it write them), or a plain number of seconds."""

from __future__ import annotations

import math
import re

DURATION_HINT = "must be a duration like 250ms, 2s, 5m or 1h"

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_AMOUNT = r"[0-9]+(?:\.[0-9]+)?"
_PART = re.compile(rf"(?P<amount>{_AMOUNT})\s*(?P<unit>ms|s|m|h)\s*")
_DURATION = re.compile(rf"{_AMOUNT}|(?:{_PART.pattern})+")


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
    text = value.strip()
    if _DURATION.fullmatch(text) is None:
        raise ValueError(DURATION_HINT)
    if _PART.match(text) is None:
        seconds = float(text)  # a plain number of seconds
    else:
        seconds = sum(
            float(part["amount"]) * _UNIT_SECONDS[part["unit"]] for part in _PART.finditer(text)
        )
    # Four hundred digits are a float of inf, refused as `.inf` is.
    if not math.isfinite(seconds):
        raise ValueError(DURATION_HINT)
    return seconds
