"""The rate and quota strategies on every limit storage: memory, a real redis-server, a real
Redis Cluster and a Sentinel group; one suite for all (the backend fixture).

Windows are short (a fraction of a second) so that sliding behaviour shows without long
sleeps; timing assertions leave room for a busy two-core machine. What only Redis does is in
test_limiters_redis.py and test_limiters_redis_failures.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from zoneinfo import ZoneInfo

import pytest

from gateway.limits import Decision, Limiter
from gateway.limits.periods import quota_period
from tests.support.limiter_backends import UTC, Backend, hits, quota_rule, rate_rule

BERLIN = ZoneInfo("Europe/Berlin")


async def test_rate_admits_exactly_the_limit_then_throttles(limiter: Limiter, subject: str) -> None:
    rate = rate_rule(5, 0.4)
    admitted = await hits(limiter, subject, 5, rate=rate)
    assert [d.outcome for d in admitted] == ["allowed"] * 5
    assert [d.rate.remaining for d in admitted if d.rate] == [4, 3, 2, 1, 0]
    assert all(d.retry_after == 0 for d in admitted)

    throttled = await limiter.hit(subject, rate, None)
    assert throttled.outcome == "throttled"
    assert throttled.rate is not None and throttled.rate.remaining == 0
    assert 0 < throttled.retry_after <= 0.4
    assert throttled.quota is None

    await asyncio.sleep(throttled.retry_after + 0.05)
    assert (await limiter.hit(subject, rate, None)).allowed


async def test_never_more_than_the_limit_in_any_window(limiter: Limiter, subject: str) -> None:
    limit, window = 3, 0.2
    rate = rate_rule(limit, window)
    # For admitted requests i and j = i + limit, the storage saw them at least one window
    # apart; since "sent" <= seen <= "answered", answered_j - sent_i can never be shorter.
    sent: list[float] = []
    answered: list[float] = []
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        before = time.monotonic()
        decision = await limiter.hit(subject, rate, None)
        if decision.allowed:
            sent.append(before)
            answered.append(time.monotonic())
        else:
            await asyncio.sleep(0)
    for i in range(len(sent) - limit):
        assert answered[i + limit] - sent[i] >= window
    # ...and it does admit again as the window slides (5 windows: 15, and 9 at least even
    # if a busy machine stalls the loop for a window or two).
    assert len(sent) >= 3 * limit


async def test_window_slides_instead_of_resetting(limiter: Limiter, subject: str) -> None:
    rate = rate_rule(4, 1.0)
    start = time.monotonic()
    assert all(d.allowed for d in await hits(limiter, subject, 2, rate=rate))
    first_pair_in = time.monotonic()  # they were admitted after `start` and before this
    await asyncio.sleep(0.5)
    assert all(d.allowed for d in await hits(limiter, subject, 2, rate=rate))
    second_pair_in = time.monotonic()  # they were admitted before this
    full = await limiter.hit(subject, rate, None)
    full_answered = time.monotonic()
    assert full.outcome == "throttled"
    # Room frees when the first pair leaves, a window after it came in (about half a window
    # from now, or less if the sleep woke late), give or take the clocks' resolution.
    assert start + 1.0 - full_answered - 0.02 <= full.retry_after
    assert full.retry_after <= first_pair_in + 1.0 - second_pair_in + 0.02

    # Until the first pair has surely left the window (the second is in it for ~0.5 s more).
    await asyncio.sleep(first_pair_in + 1.05 - time.monotonic())
    # The first pair has left the window, the second is still in it: a fixed window would
    # have started afresh and admitted four.
    asked = time.monotonic()
    later = await hits(limiter, subject, 3, rate=rate)
    assert [d.outcome for d in later] == ["allowed", "allowed", "throttled"]
    # Room frees when the second pair leaves: a window after it came in (however late the
    # sleeps woke on a busy machine), give or take the clocks' resolution.
    assert 0 < later[-1].retry_after <= second_pair_in + 1.0 - asked + 0.02


async def test_quota_admits_exactly_the_limit(limiter: Limiter, subject: str) -> None:
    quota = quota_rule(3)
    admitted = await hits(limiter, subject, 3, quota=quota)
    assert [d.quota.remaining for d in admitted if d.quota] == [2, 1, 0]
    assert all(d.rate is None for d in admitted)

    exceeded = await limiter.hit(subject, None, quota)
    assert exceeded.outcome == "quota_exceeded"
    _, end = quota_period(time.time(), "month", UTC)
    assert exceeded.retry_after == pytest.approx(end - time.time(), abs=2)
    usage = await limiter.usage(subject, quota)
    assert (usage.used, usage.remaining, usage.reset_at) == (3, 0, end)


async def test_quota_starts_afresh_with_the_next_period(limiter: Limiter, subject: str) -> None:
    quota = quota_rule(2, per="second")
    decisions = await hits(limiter, subject, 3, quota=quota)
    if decisions[-1].allowed:  # the second turned between the hits; the next one will not
        decisions = await hits(limiter, subject, 3, quota=quota)
    exceeded = decisions[-1]
    assert exceeded.outcome == "quota_exceeded"
    assert 0 < exceeded.retry_after <= 1
    await asyncio.sleep(exceeded.retry_after + 0.02)
    assert (await limiter.hit(subject, None, quota)).allowed


async def test_quota_wins_when_both_fail(limiter: Limiter, subject: str) -> None:
    rate, quota = rate_rule(2, 10), quota_rule(2, per="day", tz=BERLIN)
    assert all(d.allowed for d in await hits(limiter, subject, 2, rate=rate, quota=quota))
    both = await limiter.hit(subject, rate, quota)
    assert both.outcome == "quota_exceeded"
    assert both.quota is not None and both.rate is not None
    assert both.retry_after == both.quota.reset
    assert both.rate.remaining == 0 and both.quota.remaining == 0


async def test_a_throttled_request_uses_no_quota(limiter: Limiter, subject: str) -> None:
    rate, quota = rate_rule(1, 10), quota_rule(5)
    assert (await limiter.hit(subject, rate, quota)).allowed
    for decision in await hits(limiter, subject, 3, rate=rate, quota=quota):
        assert decision.outcome == "throttled"
        assert decision.quota is not None and decision.quota.remaining == 4
    assert (await limiter.usage(subject, quota)).used == 1


async def test_a_request_over_quota_uses_no_rate(limiter: Limiter, subject: str) -> None:
    rate, quota = rate_rule(3, 10), quota_rule(1)
    first = await limiter.hit(subject, rate, quota)
    assert first.allowed and first.rate is not None and first.rate.remaining == 2
    for decision in await hits(limiter, subject, 3, rate=rate, quota=quota):
        assert decision.outcome == "quota_exceeded"
        assert decision.rate is not None and decision.rate.remaining == 2
    await limiter.reset_quota(subject, quota)
    after_reset = await limiter.hit(subject, rate, quota)
    assert after_reset.allowed and after_reset.rate is not None
    assert after_reset.rate.remaining == 1


async def test_header_numbers(limiter: Limiter, subject: str) -> None:
    rate, quota = rate_rule(3, 10), quota_rule(100, per="day", tz=BERLIN)
    start, end = quota_period(time.time(), "day", BERLIN)
    first = await limiter.hit(subject, rate, quota)
    assert first.rate is not None and first.quota is not None
    assert (first.rate.limit, first.rate.remaining, first.rate.window) == (3, 2, 10)
    # Room frees when this, the oldest admission, leaves the window.
    assert 9 < first.rate.reset <= 10
    assert (first.quota.limit, first.quota.remaining) == (100, 99)
    assert first.quota.window == end - start
    assert first.quota.reset == pytest.approx(end - time.time(), abs=2)

    second, third, fourth = await hits(limiter, subject, 3, rate=rate, quota=quota)
    assert second.rate is not None and third.rate is not None and fourth.rate is not None
    assert (second.rate.remaining, third.rate.remaining) == (1, 0)
    assert second.rate.reset <= first.rate.reset
    assert fourth.outcome == "throttled"
    assert fourth.rate.remaining == 0
    assert fourth.retry_after == fourth.rate.reset
    assert 9 < fourth.retry_after <= 10
    assert fourth.quota is not None and fourth.quota.remaining == 97


async def test_concurrent_hits_admit_exactly_the_limit(
    limiter: Limiter, new_subject: Callable[[], str]
) -> None:
    rate_subject, quota_subject = new_subject(), new_subject()
    rate, quota = rate_rule(10, 30), quota_rule(10, per="week")
    by_rate = await asyncio.gather(*(limiter.hit(rate_subject, rate, None) for _ in range(100)))
    by_quota = await asyncio.gather(*(limiter.hit(quota_subject, None, quota) for _ in range(100)))

    assert sum(d.allowed for d in by_rate) == 10
    assert sorted(d.rate.remaining for d in by_rate if d.allowed and d.rate) == list(range(10))
    assert sum(d.outcome == "throttled" for d in by_rate) == 90
    assert sum(d.allowed for d in by_quota) == 10
    assert sum(d.outcome == "quota_exceeded" for d in by_quota) == 90


async def test_usage_and_reset_quota(limiter: Limiter, subject: str) -> None:
    quota = quota_rule(10, per="week", tz=ZoneInfo("America/New_York"))
    _, end = quota_period(time.time(), "week", quota.timezone)
    untouched = await limiter.usage(subject, quota)
    assert (untouched.limit, untouched.used, untouched.remaining) == (10, 0, 10)

    await hits(limiter, subject, 3, quota=quota)
    usage = await limiter.usage(subject, quota)
    assert (usage.limit, usage.used, usage.remaining, usage.reset_at) == (10, 3, 7, end)

    await limiter.reset_quota(subject, quota)
    assert (await limiter.usage(subject, quota)).used == 0
    decision = await limiter.hit(subject, None, quota)
    assert decision.quota is not None and decision.quota.remaining == 9


async def test_subjects_are_independent(limiter: Limiter) -> None:
    rate, quota = rate_rule(1, 10), quota_rule(1)
    tag = uuid.uuid4().hex[:8]
    # Braces would move a Redis Cluster hash tag; both keys must still share a slot.
    subjects = [f"acme-{tag}:soccer", f"acme-{tag}:tennis", f"a{{b}}c-{tag}:x.y", f"z}}-{tag}:p"]
    for subject in subjects:
        assert (await limiter.hit(subject, rate, quota)).allowed
    for subject in subjects:
        assert (await limiter.hit(subject, rate, quota)).outcome == "quota_exceeded"
        assert (await limiter.hit(subject, rate, None)).outcome == "throttled"


async def test_no_rules_admit_everything(limiter: Limiter, subject: str) -> None:
    decision = await limiter.hit(subject, None, None)
    assert decision == Decision("allowed", None, None, 0.0)


async def test_ping_answers(limiter: Limiter, backend: Backend) -> None:
    await limiter.ping()
    assert backend.errors == []
