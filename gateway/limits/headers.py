"""The rate-limit headers (README, "Headers"), from one limiter Decision.

`RateLimit-Policy` and `RateLimit` follow the IETF httpapi ratelimit-headers draft (-08 and
later): structured-field lists with one item per policy, `q` quota and `w` window in the
policy, `r` remaining and `t` seconds until reset in the live field. The `X-RateLimit-*` and
`X-Quota-*` pairs are the de facto headers clients of other gateways already parse.
"""

from __future__ import annotations

import math

from gateway.limits.base import Decision, WindowState


def whole_seconds(seconds: float) -> int:
    """Round up: telling a client to come back a little early would only earn it another 429."""
    return max(0, math.ceil(seconds - 1e-9))


# (rate limit, rate window, quota limit, quota period length) -> (RateLimit-Policy, rate
# limit, quota limit as text). These follow from the plan (and, for the quota, from the
# period's length), so only the remaining counts and the resets are formatted per request;
# a plan has one entry per period length, and the bound only matters across many reloads.
_FixedKey = tuple[int, float, int, float]
_FixedParts = tuple[str, str, str]
_fixed_parts: dict[_FixedKey, _FixedParts] = {}
_MAX_FIXED_PARTS = 1024
_NO_LIMIT = -1
_ceil = math.ceil


def limit_headers(decision: Decision) -> dict[str, str]:
    """The limit headers for `decision`, in the same order whatever the outcome."""
    # Once per request: each case is written out with its dict built in one literal and
    # whole_seconds inlined, which halves the cost of building the dict key by key.
    outcome, rate, quota, retry_after, _ = decision
    headers: dict[str, str]
    if rate is not None and quota is not None:
        rate_limit, rate_remaining, rate_reset, rate_window = rate
        quota_limit, quota_remaining, quota_reset, quota_window = quota
        key = (rate_limit, rate_window, quota_limit, quota_window)
        fixed = _fixed_parts.get(key)
        if fixed is None:
            fixed = _remember_fixed_parts(key, rate, quota)
        rate_left = str(rate_remaining)
        seconds = _ceil(rate_reset - 1e-9)
        rate_reset_text = str(seconds) if seconds > 0 else "0"
        quota_left = str(quota_remaining)
        seconds = _ceil(quota_reset - 1e-9)
        quota_reset_text = str(seconds) if seconds > 0 else "0"
        headers = {
            "X-RateLimit-Limit": fixed[1],
            "X-RateLimit-Remaining": rate_left,
            "X-RateLimit-Reset": rate_reset_text,
            "X-Quota-Limit": fixed[2],
            "X-Quota-Remaining": quota_left,
            "X-Quota-Reset": quota_reset_text,
            "RateLimit-Policy": fixed[0],
            "RateLimit": f'"rate";r={rate_left};t={rate_reset_text}, '
            f'"quota";r={quota_left};t={quota_reset_text}',
        }
    elif rate is not None:
        key = (rate.limit, rate.window, _NO_LIMIT, 0.0)
        fixed = _fixed_parts.get(key)
        if fixed is None:
            fixed = _remember_fixed_parts(key, rate, None)
        rate_left = str(rate.remaining)
        seconds = _ceil(rate.reset - 1e-9)
        rate_reset_text = str(seconds) if seconds > 0 else "0"
        headers = {
            "X-RateLimit-Limit": fixed[1],
            "X-RateLimit-Remaining": rate_left,
            "X-RateLimit-Reset": rate_reset_text,
            "RateLimit-Policy": fixed[0],
            "RateLimit": f'"rate";r={rate_left};t={rate_reset_text}',
        }
    elif quota is not None:
        key = (_NO_LIMIT, 0.0, quota.limit, quota.window)
        fixed = _fixed_parts.get(key)
        if fixed is None:
            fixed = _remember_fixed_parts(key, None, quota)
        quota_left = str(quota.remaining)
        seconds = _ceil(quota.reset - 1e-9)
        quota_reset_text = str(seconds) if seconds > 0 else "0"
        headers = {
            "X-Quota-Limit": fixed[2],
            "X-Quota-Remaining": quota_left,
            "X-Quota-Reset": quota_reset_text,
            "RateLimit-Policy": fixed[0],
            "RateLimit": f'"quota";r={quota_left};t={quota_reset_text}',
        }
    else:
        headers = {}
    if outcome != "allowed":
        seconds = _ceil(retry_after - 1e-9)
        headers["Retry-After"] = str(seconds) if seconds > 1 else "1"
    return headers


def _remember_fixed_parts(
    key: _FixedKey, rate: WindowState | None, quota: WindowState | None
) -> _FixedParts:
    policies: list[str] = []
    if rate is not None:
        policies.append(f'"rate";q={rate.limit};w={whole_seconds(rate.window)}')
    if quota is not None:
        policies.append(f'"quota";q={quota.limit};w={whole_seconds(quota.window)}')
    parts = (
        ", ".join(policies),
        str(rate.limit) if rate is not None else "",
        str(quota.limit) if quota is not None else "",
    )
    if len(_fixed_parts) >= _MAX_FIXED_PARTS:
        _fixed_parts.clear()
    _fixed_parts[key] = parts
    return parts
