"""The rate-limit headers of the contract's §5, from one limiter Decision.

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
# period's length), yet were formatted anew on every request; a plan has one entry per
# period length, and the bound only matters across many reloads.
_FixedKey = tuple[int, float, int, float]
_FixedParts = tuple[str, str, str]
_fixed_parts: dict[_FixedKey, _FixedParts] = {}
_MAX_FIXED_PARTS = 1024
_NO_LIMIT = -1


def limit_headers(decision: Decision) -> dict[str, str]:
    """The headers of §5 for `decision`, in the same order whatever the outcome."""
    rate = decision.rate
    quota = decision.quota
    if rate is None and quota is None:
        headers: dict[str, str] = {}
    else:
        key = (
            rate.limit if rate is not None else _NO_LIMIT,
            rate.window if rate is not None else 0.0,
            quota.limit if quota is not None else _NO_LIMIT,
            quota.window if quota is not None else 0.0,
        )
        fixed = _fixed_parts.get(key)
        if fixed is None:
            fixed = _remember_fixed_parts(key, rate, quota)
        policy, rate_limit, quota_limit = fixed
        headers = {}
        if rate is not None:
            rate_remaining = str(rate.remaining)
            rate_reset = str(whole_seconds(rate.reset))
            headers["X-RateLimit-Limit"] = rate_limit
            headers["X-RateLimit-Remaining"] = rate_remaining
            headers["X-RateLimit-Reset"] = rate_reset
            rate_live = f'"rate";r={rate_remaining};t={rate_reset}'
        if quota is not None:
            quota_remaining = str(quota.remaining)
            quota_reset = str(whole_seconds(quota.reset))
            headers["X-Quota-Limit"] = quota_limit
            headers["X-Quota-Remaining"] = quota_remaining
            headers["X-Quota-Reset"] = quota_reset
            quota_live = f'"quota";r={quota_remaining};t={quota_reset}'
        headers["RateLimit-Policy"] = policy
        if rate is None:
            headers["RateLimit"] = quota_live
        elif quota is None:
            headers["RateLimit"] = rate_live
        else:
            headers["RateLimit"] = f"{rate_live}, {quota_live}"
    if decision.outcome != "allowed":
        headers["Retry-After"] = str(max(1, whole_seconds(decision.retry_after)))
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
