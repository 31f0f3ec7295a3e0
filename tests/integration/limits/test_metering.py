"""Metering in the limit storages themselves: cost, refunds, credit and history, on memory, a
real redis-server and a real Redis Cluster, and a randomized run of all of them interleaved.

The history and its export are in test_metering_history.py, what Redis alone may do to
metering (restarts, refunds unanswered or run late, a lagging clock) in
test_metering_redis.py.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from zoneinfo import ZoneInfo

import pytest

from gateway.config.model import QuotaRule, RateRule, StorageConfig
from gateway.limits import Limiter, create_limiter
from gateway.limits.base import DayUsage, Receipt, day_of
from gateway.limits.periods import quota_period
from tests.support.metering_quotas import REFUND_5XX, new_key, quota

# Months of these zones all begin at different instants.
ZONES = (
    "UTC",
    "Asia/Kathmandu",
    "America/New_York",
    "Pacific/Chatham",
    "Asia/Kolkata",
    "America/St_Johns",
    "Australia/Eucla",
)


@pytest.fixture(params=["memory", "redis", "cluster"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[Limiter]:
    url = "memory://"
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url
    elif request.param == "cluster":
        url = request.getfixturevalue("redis_cluster").url
    made = create_limiter(StorageConfig(url=url, timeout=2.0))
    yield made
    await made.close()


async def test_cost_takes_units_and_refuses_when_fewer_are_left(limiter: Limiter) -> None:
    subject = f"{new_key()}:soccer"
    rule = quota(25, refund=False)
    taken = [await limiter.hit(subject, None, rule, 10, "pro", settles=True) for _ in range(3)]
    assert [d.outcome for d in taken] == ["allowed", "allowed", "quota_exceeded"]
    assert [d.quota.remaining for d in taken if d.quota] == [15, 5, 5]
    # The refused one used nothing; a cheaper request still fits.
    assert (await limiter.hit(subject, None, rule, 5, "pro", settles=True)).allowed
    usage = await limiter.usage(subject, rule)
    assert (usage.used, usage.remaining) == (25, 0)


async def test_rate_counts_requests_whatever_the_cost(limiter: Limiter) -> None:
    subject = f"{new_key()}:soccer"
    rate = RateRule(3, 10.0, "10s")
    outcomes = [
        (await limiter.hit(subject, rate, quota(1000), 50, "pro", settles=True)).outcome
        for _ in range(4)
    ]
    assert outcomes == ["allowed", "allowed", "allowed", "throttled"]


async def test_refund_gives_back_once_and_never_below_zero(limiter: Limiter) -> None:
    subject = f"{new_key()}:soccer"
    rule = quota(100)
    decision = await limiter.hit(subject, None, rule, 7, "pro", settles=True)
    receipt = decision.receipt
    assert receipt is not None
    await limiter.reset_quota(subject, rule)  # used 0 now: the refund must stop at zero
    assert await limiter.refund(subject, receipt) == 0
    assert (await limiter.usage(subject, rule)).used == 0

    again = await limiter.hit(subject, None, rule, 7, "pro", settles=True)
    assert again.receipt is not None
    assert await limiter.refund(subject, again.receipt) == 7
    assert (await limiter.usage(subject, rule)).used == 0
    # An admission the caller did not ask to settle carries no receipt, whatever its quota.
    assert (await limiter.hit(subject, None, rule, 1, "pro")).receipt is None


async def test_a_refund_from_before_a_reset_takes_nothing_admitted_since(
    limiter: Limiter,
) -> None:
    key = new_key()
    subject = f"{key}:soccer"
    rule = quota(100)
    before = await limiter.hit(subject, None, rule, 10, "pro", settles=True)
    await limiter.reset_quota(subject, rule)
    since = [await limiter.hit(subject, None, rule, 1, "pro", settles=True) for _ in range(5)]
    assert all(decision.allowed for decision in since)
    # The reset took the ten units already: its refund finds a counter that is not its own.
    assert before.receipt is not None
    assert await limiter.refund(subject, before.receipt) == 0
    assert (await limiter.usage(subject, rule)).used == 5
    # The day's history, which no reset touches, still gives the ten back: 6 requests, 5 kept.
    today = day_of(time.time())
    assert await limiter.history(key, today, today) == [DayUsage(today, subject, "pro", 6, 5)]
    # Admissions since the reset are refunded from the counter as it is now.
    assert since[0].receipt is not None
    assert await limiter.refund(subject, since[0].receipt) == 1
    assert (await limiter.usage(subject, rule)).used == 4


async def test_a_charge_takes_more_whatever_the_limit_and_only_from_its_own_counter(
    limiter: Limiter,
) -> None:
    """What a cost the upstream reports above the hold does (README "Metering")."""
    key = new_key()
    subject = f"{key}:soccer"
    rule = quota(5, refund=False)
    held = await limiter.hit(subject, None, rule, 1, "pro", None, True)
    assert held.receipt is not None  # asked for, though the quota refunds nothing
    assert await limiter.charge(subject, held.receipt, 8) == 8
    usage = await limiter.usage(subject, rule)
    assert (usage.used, usage.remaining) == (9, 0)
    assert (
        await limiter.hit(subject, None, rule, 1, "pro", settles=True)
    ).outcome == "quota_exceeded"
    # A receipt from before a reset charges nothing the reset cleared; the day's units (the
    # bill) take it all the same.
    await limiter.reset_quota(subject, rule)
    assert await limiter.charge(subject, held.receipt, 3) == 0
    assert (await limiter.usage(subject, rule)).used == 0
    today = day_of(time.time())
    assert await limiter.history(key, today, today) == [DayUsage(today, subject, "pro", 1, 12)]


async def test_a_plan_without_a_quota_settles_its_days_units(limiter: Limiter) -> None:
    key = new_key()
    subject = f"{key}:soccer"
    rate = RateRule(100, 1.0, "second")
    assert (await limiter.hit(subject, rate, None, 10, "payg")).receipt is None
    decision = await limiter.hit(subject, rate, None, 10, "payg", None, True)
    receipt = decision.receipt
    assert receipt is not None and receipt.quota is None
    assert await limiter.charge(subject, receipt, 30) == 0  # no quota to add to
    assert await limiter.refund(subject, receipt._replace(cost=4)) == 0
    today = day_of(time.time())
    assert await limiter.history(key, today, today) == [
        DayUsage(today, subject, "payg", 2, 10 + 10 + 30 - 4)
    ]


async def test_credit_adds_to_this_period_and_shows_in_the_limit(limiter: Limiter) -> None:
    subject = f"{new_key()}:soccer"
    rule = quota(2, refund=False)
    assert [
        (await limiter.hit(subject, None, rule, 1, "p", settles=True)).outcome for _ in range(3)
    ] == [
        "allowed",
        "allowed",
        "quota_exceeded",
    ]
    usage = (await limiter.credit(subject, rule, 3)).usage
    assert (usage.limit, usage.used, usage.remaining, usage.credit) == (5, 2, 3, 3)
    decisions = [await limiter.hit(subject, None, rule, 1, "p", settles=True) for _ in range(4)]
    assert [d.outcome for d in decisions] == ["allowed"] * 3 + ["quota_exceeded"]
    assert decisions[0].quota is not None and decisions[0].quota.limit == 5
    # Credit on a period nobody has used yet.
    fresh = f"{new_key()}:soccer"
    usage = (await limiter.credit(fresh, rule, 4)).usage
    assert (usage.limit, usage.used, usage.credit) == (6, 0, 4)


async def test_a_credit_with_an_idempotency_key_is_added_once(limiter: Limiter) -> None:
    subject = f"{new_key()}:soccer"
    rule = quota(2, refund=False)
    first = await limiter.credit(subject, rule, 3, once="order-17")
    assert (first.usage.credit, first.amount, first.replayed) == (3, 3, False)
    again = await limiter.credit(subject, rule, 3, once="order-17")
    assert (again.usage.credit, again.amount, again.replayed) == (3, 3, True)
    # The first call's amount is told, whatever the retry says.
    other = await limiter.credit(subject, rule, 9, once="order-17")
    assert (other.usage.credit, other.amount, other.replayed) == (3, 3, True)
    # Another key, another subscription with the same key, or no key: added.
    assert (await limiter.credit(subject, rule, 1, once="order-18")).usage.credit == 4
    assert (await limiter.credit(subject, rule, 1)).usage.credit == 5
    elsewhere = f"{new_key()}:soccer"
    assert (await limiter.credit(elsewhere, rule, 2, once="order-17")).usage.credit == 2


async def test_history_counts_requests_and_units_kept(limiter: Limiter) -> None:
    key = new_key()
    rule = quota(1000)
    receipts: list[Receipt] = []
    for _ in range(3):
        decision = await limiter.hit(f"{key}:soccer", None, rule, 10, "pro", settles=True)
        assert decision.receipt is not None
        receipts.append(decision.receipt)
    await limiter.hit(f"{key}:weather", RateRule(100, 1.0, "second"), None, 2, "free")
    await limiter.hit(
        f"{key}:soccer", None, quota(1, refund=False), 5, "pro", settles=True
    )  # refused
    await limiter.refund(f"{key}:soccer", receipts[0])
    today = day_of(time.time())
    history = await limiter.history(key, today - 3, today)
    assert history == [
        DayUsage(today, f"{key}:soccer", "pro", 3, 20),
        DayUsage(today, f"{key}:weather", "free", 1, 2),
    ]
    assert await limiter.history(key, today - 3, today - 1) == []


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_randomized_interleavings_keep_the_invariants(limiter: Limiter, seed: int) -> None:
    """Admissions (of random cost), refunds, credits and period changes in random order and
    concurrency: 0 <= used <= limit + credit at every step, the refunds sum up exactly, and
    never more than the rate's limit in any window."""
    rng = random.Random(seed)
    key = new_key()
    rate = RateRule(8, 0.3, "300ms")
    limit = 30
    period = 0
    credit = 0
    expected_used = 0
    outstanding: list[Receipt] = []
    admitted_at: list[tuple[float, float]] = []  # (sent, answered) of each admission

    def rule() -> QuotaRule:
        # A new period without waiting for one: the month of another time zone begins at
        # another instant, so it has a counter of its own.
        return QuotaRule(limit, "month", ZoneInfo(ZONES[period]), REFUND_5XX)  # type: ignore[arg-type]

    subject = f"{key}:soccer"
    for _step in range(60):
        action = rng.random()
        if action < 0.6:
            costs = [rng.randint(1, 6) for _ in range(rng.randint(1, 6))]
            sent = time.monotonic()
            decisions = await asyncio.gather(
                *(limiter.hit(subject, rate, rule(), cost, "pro", settles=True) for cost in costs)
            )
            answered = time.monotonic()
            for cost, decision in zip(costs, decisions, strict=True):
                if decision.allowed:
                    expected_used += cost
                    admitted_at.append((sent, answered))
                    assert decision.receipt is not None
                    outstanding.append(decision.receipt)
        elif action < 0.8 and outstanding:
            receipt = outstanding.pop(rng.randrange(len(outstanding)))
            returned = await limiter.refund(subject, receipt)
            if receipt.period_start == _period_start(rule()):
                assert returned == receipt.cost
                expected_used -= returned
            else:  # of an earlier period: its counter is gone (memory) or not the current one
                assert returned in (0, receipt.cost)
        elif action < 0.9:
            amount = rng.randint(1, 5)
            credit += amount
            await limiter.credit(subject, rule(), amount)
        elif period < len(ZONES) - 1:
            period += 1
            credit = expected_used = 0
            outstanding = [r for r in outstanding if rng.random() < 0.5]  # some stay stale
        usage = await limiter.usage(subject, rule())
        assert usage.used == expected_used
        assert 0 <= usage.used <= limit + credit == usage.limit
        if action < 0.6:
            await asyncio.sleep(rng.choice((0, 0, 0.05, 0.1)))
    # Never more than the rate's limit in any window: admissions i and i + limit were seen
    # by the storage at least a window apart.
    for i in range(len(admitted_at) - rate.limit):
        assert admitted_at[i + rate.limit][1] - admitted_at[i][0] >= rate.window
    assert len(admitted_at) > rate.limit


def _period_start(rule: QuotaRule) -> float:
    return quota_period(time.time(), rule.per, rule.timezone)[0]
