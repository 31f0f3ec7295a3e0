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


def limit_headers(decision: Decision) -> dict[str, str]:
    headers: dict[str, str] = {}
    policies: list[str] = []
    live: list[str] = []
    for name, state in (("rate", decision.rate), ("quota", decision.quota)):
        if state is None:
            continue
        policies.append(f'"{name}";q={state.limit};w={whole_seconds(state.window)}')
        live.append(f'"{name}";r={state.remaining};t={whole_seconds(state.reset)}')
        _legacy_headers(headers, "X-RateLimit" if name == "rate" else "X-Quota", state)
    if policies:
        headers["RateLimit-Policy"] = ", ".join(policies)
        headers["RateLimit"] = ", ".join(live)
    if not decision.allowed:
        headers["Retry-After"] = str(max(1, whole_seconds(decision.retry_after)))
    return headers


def _legacy_headers(headers: dict[str, str], prefix: str, state: WindowState) -> None:
    headers[f"{prefix}-Limit"] = str(state.limit)
    headers[f"{prefix}-Remaining"] = str(state.remaining)
    headers[f"{prefix}-Reset"] = str(whole_seconds(state.reset))
