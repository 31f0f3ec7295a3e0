"""What a limit check's reply from Redis (`hit.lua`) means: the decision it makes, with the
state of each limit for the headers and, for an admission that may be settled, its receipt."""

from __future__ import annotations

from typing import Any

from gateway.config.model import QuotaRule, RateRule
from gateway.limits.base import Decision, Outcome, Receipt, WindowState, make_decision

_OUTCOMES: tuple[Outcome, ...] = ("allowed", "throttled", "quota_exceeded")
# Results built by tuple.__new__, as the memory limiter builds them (see base.py).
_new_tuple = tuple.__new__


def decision_from_reply(
    reply: Any,
    rate: RateRule | None,
    quota: QuotaRule | None,
    cost: int,
    plan: str,
    start: float,
    end: float,
    now: float,
    day: int,
    settles: bool = False,
) -> Decision:
    """The decision of a check that ran in time (outcome 0, 1 or 2), made at `now` (UTC day
    `day`) for the quota period from `start` to `end`; an admission's receipt when `settles`
    asks for one."""
    # Integer replies: redis-py hands them over as ints already.
    code, used, credit, in_window, wait_us, quota_born, day_born, _, _ = reply
    rate_state = None
    if rate is not None:
        limit = rate.limit
        rate_state = _new_tuple(
            WindowState,
            (
                limit,
                limit - in_window if in_window < limit else 0,
                wait_us / 1_000_000 if wait_us > 0 else 0.0,
                rate.window,
            ),
        )
    quota_state = None
    receipt = None
    if quota is not None:
        limit = quota.limit + credit
        quota_state = _new_tuple(
            WindowState,
            (
                limit,
                limit - used if used < limit else 0,
                end - now if end > now else 0.0,
                end - start,
            ),
        )
        if code == 0 and settles:
            receipt = Receipt(cost, plan, start, quota_born, day, day_born, quota)
    elif code == 0 and settles:
        receipt = Receipt(cost, plan, 0.0, 0, day, day_born, None)
    if code == 0:
        return _new_tuple(Decision, ("allowed", rate_state, quota_state, 0.0, receipt))
    return make_decision(_OUTCOMES[code], rate_state, quota_state)
