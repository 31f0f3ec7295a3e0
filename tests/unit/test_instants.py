"""RFC 3339 instants of `expires`, in the YAML and the admin API."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from gateway.config.instants import INSTANT_HINT, format_instant, parse_instant

NEW_YEAR_2027 = datetime(2027, 1, 1, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    "written",
    [
        "2027-01-01T00:00:00Z",
        "2027-01-01t00:00:00z",
        "2027-01-01 00:00:00Z",
        "2027-01-01T01:00:00+01:00",
        "2027-01-01T00:00:00.000Z",
        "2027-01-01",
        datetime(2027, 1, 1, tzinfo=UTC),  # what YAML makes of an unquoted time with a zone
        datetime(2027, 1, 1, 2, tzinfo=timezone(timedelta(hours=2))),
        date(2027, 1, 1),  # ... and of an unquoted date
    ],
)
def test_parse_instant(written: object) -> None:
    assert parse_instant(written) == NEW_YEAR_2027


@pytest.mark.parametrize(
    "written",
    [
        "2027-01-01T00:00:00",  # no offset: the hour would depend on the machine
        datetime(2027, 1, 1),
        "next tuesday",
        "",
        "2027-13-01T00:00:00Z",
        1798761600,  # a unix time is not an RFC 3339 time
        # ISO 8601 that RFC 3339 is not, which datetime.fromisoformat takes on its own
        "2027-W01-1",
        "20270101T000000Z",
        "2027-01-01T00:00:00+02",
        "2027-01-01T00:00:00+0200",
        "2027-01-01T00:00Z",
        True,
        None,
    ],
)
def test_parse_instant_refuses(written: object) -> None:
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_instant(written)
    assert "RFC 3339" in INSTANT_HINT


def test_format_instant_is_utc_whole_seconds() -> None:
    assert format_instant(NEW_YEAR_2027 + 0.75) == "2027-01-01T00:00:00Z"
    assert parse_instant(format_instant(NEW_YEAR_2027)) == NEW_YEAR_2027


@pytest.mark.parametrize(
    "text", ["9999-12-31T23:59:59-12:00", "0001-01-01T00:00:00+01:00", "1969-12-31T23:59:59Z"]
)
def test_an_instant_outside_what_can_be_shown_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="must be between"):
        parse_instant(text)


def test_a_stored_time_out_of_range_is_shown_clamped() -> None:
    # Stored before the range was enforced: shown, not an error that breaks a listing.
    assert format_instant(1e18) == "9999-12-31T23:59:59Z"
    assert format_instant(-1e18) == "1970-01-01T00:00:00Z"
