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


# Every limit header name the gateway sends, and the other spellings upstreams use for the
# same figures (earlier drafts of the IETF headers, GitHub's X-RateLimit-Used): a proxied
# answer carries the gateway's lines of these, never the upstream's, whatever the plan limits
# (a plan without a quota sends no X-Quota-* at all).
LIMIT_HEADER_NAMES = (
    "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset",
    "X-Quota-Limit", "X-Quota-Remaining", "X-Quota-Reset", "RateLimit-Policy", "RateLimit",
    "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "X-RateLimit-Used",
)  # fmt: skip


def limit_header_lines(decision: Decision) -> str:
    """The limit headers for `decision` as header lines ("Name: value\r\n" each), in the same
    order whatever the outcome: what an admitted request's answer carries."""
    # Once per request: each case is one f-string with whole_seconds inlined. Rendering the
    # lines at once costs half of building a dict and encoding it line by line
    # (bench/PROFILE.md, "Session 4").
    outcome, rate, quota, retry_after, _ = decision
    if rate is not None and quota is not None:
        rate_limit, rate_left, rate_reset, rate_window = rate
        quota_limit, quota_left, quota_reset, quota_window = quota
        key = (rate_limit, rate_window, quota_limit, quota_window)
        fixed = _fixed_parts.get(key)
        if fixed is None:
            fixed = _remember_fixed_parts(key, rate, quota)
        seconds = _ceil(rate_reset - 1e-9)
        rate_reset_in = seconds if seconds > 0 else 0
        seconds = _ceil(quota_reset - 1e-9)
        quota_reset_in = seconds if seconds > 0 else 0
        lines = (
            f"X-RateLimit-Limit: {fixed[1]}\r\nX-RateLimit-Remaining: {rate_left}\r\n"
            f"X-RateLimit-Reset: {rate_reset_in}\r\nX-Quota-Limit: {fixed[2]}\r\n"
            f"X-Quota-Remaining: {quota_left}\r\nX-Quota-Reset: {quota_reset_in}\r\n"
            f"RateLimit-Policy: {fixed[0]}\r\n"
            f'RateLimit: "rate";r={rate_left};t={rate_reset_in}, '
            f'"quota";r={quota_left};t={quota_reset_in}\r\n'
        )
    elif rate is not None:
        key = (rate.limit, rate.window, _NO_LIMIT, 0.0)
        fixed = _fixed_parts.get(key)
        if fixed is None:
            fixed = _remember_fixed_parts(key, rate, None)
        seconds = _ceil(rate.reset - 1e-9)
        rate_reset_in = seconds if seconds > 0 else 0
        lines = (
            f"X-RateLimit-Limit: {fixed[1]}\r\nX-RateLimit-Remaining: {rate.remaining}\r\n"
            f"X-RateLimit-Reset: {rate_reset_in}\r\nRateLimit-Policy: {fixed[0]}\r\n"
            f'RateLimit: "rate";r={rate.remaining};t={rate_reset_in}\r\n'
        )
    elif quota is not None:
        key = (_NO_LIMIT, 0.0, quota.limit, quota.window)
        fixed = _fixed_parts.get(key)
        if fixed is None:
            fixed = _remember_fixed_parts(key, None, quota)
        seconds = _ceil(quota.reset - 1e-9)
        quota_reset_in = seconds if seconds > 0 else 0
        lines = (
            f"X-Quota-Limit: {fixed[2]}\r\nX-Quota-Remaining: {quota.remaining}\r\n"
            f"X-Quota-Reset: {quota_reset_in}\r\nRateLimit-Policy: {fixed[0]}\r\n"
            f'RateLimit: "quota";r={quota.remaining};t={quota_reset_in}\r\n'
        )
    else:
        lines = ""
    if outcome != "allowed":
        seconds = _ceil(retry_after - 1e-9)
        lines += f"Retry-After: {seconds if seconds > 1 else 1}\r\n"
    return lines


def limit_headers(decision: Decision) -> dict[str, str]:
    """`limit_header_lines` as a dict, in the same order: for the gateway's own answers (a
    refusal's problem+json, a failure after the limits)."""
    return header_dict(limit_header_lines(decision))


def header_dict(lines: str) -> dict[str, str]:
    """Header lines ("Name: value\r\n" each, as `limit_header_lines` writes) as a dict."""
    return dict(line.split(": ", 1) for line in lines.split("\r\n") if line)


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
