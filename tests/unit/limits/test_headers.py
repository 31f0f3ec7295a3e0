"""The rate-limit headers (README, "Headers"), exactly, in order, with the plan's parts cached."""

from __future__ import annotations

from gateway.limits.base import Decision, WindowState
from gateway.limits.headers import limit_headers
from tests.support.instants import HOUR


def rate(remaining: int, reset: float, limit: int = 10, window: float = 1.0) -> WindowState:
    return WindowState(limit=limit, remaining=remaining, reset=reset, window=window)


def quota(
    remaining: int, reset: float, limit: int = 1000, window: float = 24 * HOUR
) -> WindowState:
    return WindowState(limit=limit, remaining=remaining, reset=reset, window=window)


def test_admitted_with_both_limits() -> None:
    headers = limit_headers(Decision("allowed", rate(9, 0.4), quota(999, 5000.2)))
    assert list(headers.items()) == [
        ("X-RateLimit-Limit", "10"),
        ("X-RateLimit-Remaining", "9"),
        ("X-RateLimit-Reset", "1"),
        ("X-Quota-Limit", "1000"),
        ("X-Quota-Remaining", "999"),
        ("X-Quota-Reset", "5001"),
        ("RateLimit-Policy", '"rate";q=10;w=1, "quota";q=1000;w=86400'),
        ("RateLimit", '"rate";r=9;t=1, "quota";r=999;t=5001'),
    ]


def test_throttled_with_the_rate_only() -> None:
    decision = Decision("throttled", rate(0, 2.5, limit=3, window=10), None, retry_after=2.5)
    assert list(limit_headers(decision).items()) == [
        ("X-RateLimit-Limit", "3"),
        ("X-RateLimit-Remaining", "0"),
        ("X-RateLimit-Reset", "3"),
        ("RateLimit-Policy", '"rate";q=3;w=10'),
        ("RateLimit", '"rate";r=0;t=3'),
        ("Retry-After", "3"),
    ]


def test_quota_exceeded_with_the_quota_only() -> None:
    decision = Decision("quota_exceeded", None, quota(0, 59.0, limit=5), retry_after=59.0)
    assert list(limit_headers(decision).items()) == [
        ("X-Quota-Limit", "5"),
        ("X-Quota-Remaining", "0"),
        ("X-Quota-Reset", "59"),
        ("RateLimit-Policy", '"quota";q=5;w=86400'),
        ("RateLimit", '"quota";r=0;t=59'),
        ("Retry-After", "59"),
    ]


def test_seconds_round_up_never_below_zero_and_retry_after_is_at_least_one() -> None:
    decision = Decision(
        "throttled", rate(0, -0.2, window=0.5), quota(7, 1e-12, window=0.25), retry_after=0.0
    )
    headers = limit_headers(decision)
    assert headers["X-RateLimit-Reset"] == "0"
    assert headers["X-Quota-Reset"] == "0"
    assert headers["RateLimit-Policy"] == '"rate";q=10;w=1, "quota";q=1000;w=1'
    assert headers["Retry-After"] == "1"


def test_no_limits_no_headers() -> None:
    assert limit_headers(Decision("allowed", None, None)) == {}


def test_remaining_and_reset_change_while_the_plan_parts_are_reused() -> None:
    first = limit_headers(Decision("allowed", rate(9, 0.9), quota(999, 100)))
    first["X-RateLimit-Remaining"] = "changed by a caller"
    second = limit_headers(Decision("allowed", rate(8, 0.5), quota(998, 99)))
    assert second["X-RateLimit-Remaining"] == "8"
    assert second["RateLimit"] == '"rate";r=8;t=1, "quota";r=998;t=99'
    assert second["RateLimit-Policy"] == first["RateLimit-Policy"]


def test_a_quota_period_of_another_length_gets_its_own_policy() -> None:
    # The day the clocks go forward lasts 23 hours; the same plan's policy says so.
    normal = limit_headers(Decision("allowed", None, quota(1, 10)))
    short = limit_headers(Decision("allowed", None, quota(1, 10, window=23 * HOUR)))
    other_limit = limit_headers(Decision("allowed", None, quota(1, 10, limit=50)))
    assert normal["RateLimit-Policy"] == '"quota";q=1000;w=86400'
    assert short["RateLimit-Policy"] == '"quota";q=1000;w=82800'
    assert (other_limit["RateLimit-Policy"], other_limit["X-Quota-Limit"]) == (
        '"quota";q=50;w=86400',
        "50",
    )
