"""Instants written as calendar dates, for tests of periods and windows."""

from __future__ import annotations

from datetime import UTC, datetime

HOUR = 3600.0


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    """The Unix time of a UTC wall-clock moment."""
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()
