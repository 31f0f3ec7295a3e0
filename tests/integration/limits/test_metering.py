"""Metering in the limit storages themselves: cost, refunds, credit and history, on memory, a
real redis-server and a real Redis Cluster, and a randomized run of all of them interleaved.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gateway.config.model import QuotaRule, RateRule, StorageConfig
from gateway.limits import Limiter, create_limiter
from gateway.limits.base import HISTORY_DAYS, DayUsage, Receipt, StorageError, day_of, day_text
from gateway.limits.memory import MemoryLimiter
from gateway.limits.metering import Refunds
from gateway.limits.periods import quota_period
from gateway.limits.redis import RedisLimiter
from gateway.limits.redis_clients import open_storage_redis
from tests.support.redis_servers import RedisClusterNodes, RedisServer

UTC = ZoneInfo("UTC")
REFUND_5XX: frozenset[str] = frozenset({"5xx"})
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


def quota(limit: int, refund: bool = True) -> QuotaRule:
    return QuotaRule(limit, "month", UTC, REFUND_5XX if refund else frozenset())  # type: ignore[arg-type]


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


def new_key() -> str:
    return f"meter-{uuid.uuid4().hex[:10]}"


async def test_cost_takes_units_and_refuses_when_fewer_are_left(limiter: Limiter) -> None:
    subject = f"{new_key()}:soccer"
    rule = quota(25, refund=False)
    taken = [await limiter.hit(subject, None, rule, 10, "pro") for _ in range(3)]
    assert [d.outcome for d in taken] == ["allowed", "allowed", "quota_exceeded"]
    assert [d.quota.remaining for d in taken if d.quota] == [15, 5, 5]
    # The refused one used nothing; a cheaper request still fits.
    assert (await limiter.hit(subject, None, rule, 5, "pro")).allowed
    usage = await limiter.usage(subject, rule)
    assert (usage.used, usage.remaining) == (25, 0)


async def test_rate_counts_requests_whatever_the_cost(limiter: Limiter) -> None:
    subject = f"{new_key()}:soccer"
    rate = RateRule(3, 10.0, "10s")
    outcomes = [
        (await limiter.hit(subject, rate, quota(1000), 50, "pro")).outcome for _ in range(4)
    ]
    assert outcomes == ["allowed", "allowed", "allowed", "throttled"]


async def test_refund_gives_back_once_and_never_below_zero(limiter: Limiter) -> None:
    subject = f"{new_key()}:soccer"
    rule = quota(100)
    decision = await limiter.hit(subject, None, rule, 7, "pro")
    receipt = decision.receipt
    assert receipt is not None
    await limiter.reset_quota(subject, rule)  # used 0 now: the refund must stop at zero
    assert await limiter.refund(subject, receipt) == 0
    assert (await limiter.usage(subject, rule)).used == 0

    again = await limiter.hit(subject, None, rule, 7, "pro")
    assert again.receipt is not None
    assert await limiter.refund(subject, again.receipt) == 7
    assert (await limiter.usage(subject, rule)).used == 0
    # A plan without refund_on gives no receipt at all.
    assert (await limiter.hit(subject, None, quota(100, refund=False), 1, "pro")).receipt is None


async def test_a_refund_from_before_a_reset_takes_nothing_admitted_since(
    limiter: Limiter,
) -> None:
    key = new_key()
    subject = f"{key}:soccer"
    rule = quota(100)
    before = await limiter.hit(subject, None, rule, 10, "pro")
    await limiter.reset_quota(subject, rule)
    since = [await limiter.hit(subject, None, rule, 1, "pro") for _ in range(5)]
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


async def test_credit_adds_to_this_period_and_shows_in_the_limit(limiter: Limiter) -> None:
    subject = f"{new_key()}:soccer"
    rule = quota(2, refund=False)
    assert [(await limiter.hit(subject, None, rule, 1, "p")).outcome for _ in range(3)] == [
        "allowed",
        "allowed",
        "quota_exceeded",
    ]
    usage = (await limiter.credit(subject, rule, 3)).usage
    assert (usage.limit, usage.used, usage.remaining, usage.credit) == (5, 2, 3, 3)
    decisions = [await limiter.hit(subject, None, rule, 1, "p") for _ in range(4)]
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
        decision = await limiter.hit(f"{key}:soccer", None, rule, 10, "pro")
        assert decision.receipt is not None
        receipts.append(decision.receipt)
    await limiter.hit(f"{key}:weather", RateRule(100, 1.0, "second"), None, 2, "free")
    await limiter.hit(f"{key}:soccer", None, quota(1, refund=False), 5, "pro")  # refused
    await limiter.refund(f"{key}:soccer", receipts[0])
    today = day_of(time.time())
    history = await limiter.history(key, today - 3, today)
    assert history == [
        DayUsage(today, f"{key}:soccer", "pro", 3, 20),
        DayUsage(today, f"{key}:weather", "free", 1, 2),
    ]
    assert await limiter.history(key, today - 3, today - 1) == []


async def test_history_of_the_days_kept_is_read_in_one_round_trip(
    fresh_redis_server: RedisServer,
) -> None:
    limiter = create_limiter(StorageConfig(url=fresh_redis_server.url, timeout=2.0))
    admin = fresh_redis_server.client()
    try:
        key = new_key()
        for product in ("soccer", "weather"):
            await limiter.hit(f"{key}:{product}", None, None, 2, "pro")
        today = day_of(time.time())
        # Connected, and the subscriptions recorded, before the measurement.
        await limiter.history(key, today, today)
        stats = admin.info("stats")
        if "total_reads_processed" not in stats:
            pytest.skip("this redis-server does not count its reads")
        reads_before = stats["total_reads_processed"]
        history = await limiter.history(key, today - HISTORY_DAYS, today)
        reads = admin.info("stats")["total_reads_processed"] - reads_before
    finally:
        admin.close()
        await limiter.close()
    assert history == [
        DayUsage(today, f"{key}:soccer", "pro", 1, 2),
        DayUsage(today, f"{key}:weather", "pro", 1, 2),
    ]
    # Redis reads a client's socket once per arrival of commands: the subscriptions, the
    # 802 day reads (about 50 kB, so a few reads of its 16 kB buffer) and the second INFO.
    # A round trip per day would be over 400.
    assert reads <= 20, reads


def _other_subscriptions(admin: Any, names: list[str], count: int) -> None:
    """`count` subscriptions of other keys, each in every set named (as written by gateways
    of either layout), so that reading one of those sets whole is megabytes."""
    for begin in range(0, count, 20_000):
        members = [f"other-{i:06d}.test:soccer" for i in range(begin, begin + 20_000)]
        for name in names:
            admin.sadd(name, *members)


def _sent_by(admin: Any) -> int:
    return int(admin.info("stats")["total_net_output_bytes"])


async def test_history_and_export_read_what_they_answer_whatever_the_storage_holds(
    fresh_redis_server: RedisServer,
) -> None:
    """A key's history read the set of every subscription ever and kept the key's (at 250,000
    subscriptions that took longer than storage.timeout: a 503), and the export read every
    subscription for every day of its range. Now a key's history reads the key's own set, and
    each day of the export that day's."""
    limiter = create_limiter(StorageConfig(url=fresh_redis_server.url, timeout=0.25))
    admin = fresh_redis_server.client()
    key = new_key()
    today = day_of(time.time())
    expected = [DayUsage(today, f"{key}:soccer", "pro", 1, 2)]
    try:
        await limiter.hit(f"{key}:soccer", None, None, 2, "pro")
        assert await limiter.history(key, today, today) == expected  # recorded by now
        # A storage that never had the old layout's set of every subscription never gets it:
        # it has no expiry, and nothing would read it.
        assert not admin.exists("gw:subscriptions")
        # 300,000 subscriptions of other keys, of a day before the export's range, and in the
        # set of every one.
        _other_subscriptions(
            admin, ["gw:subscriptions", f"gw:subs:day:{day_text(today - 40)}"], 300_000
        )
        before = _sent_by(admin)
        assert await limiter.history(key, today - HISTORY_DAYS, today) == expected
        assert _sent_by(admin) - before < 100_000
        before = _sent_by(admin)
        days = [line async for batch in limiter.export(today - 30, today) for line in batch]
        assert days == expected
        assert _sent_by(admin) - before < 100_000
    finally:
        admin.close()
        await limiter.close()


async def test_a_day_of_many_subscriptions_is_exported_without_holding_the_event_loop(
    fresh_redis_server: RedisServer,
) -> None:
    """The export read a day's set of subscriptions whole (SMEMBERS), decoded and sorted it in
    one go: with 120,000 subscriptions a day that held the event loop 0.5-1 s at the start of
    each day, so a gateway's proxy traffic stalled as long, and its own next storage call (and
    the proxy's) timed out, cutting the export short. Now the set is read a page at a time,
    each page sorted apart and the pages merged as the lines are read."""
    limiter = create_limiter(StorageConfig(url=fresh_redis_server.url, timeout=2.0))
    admin = fresh_redis_server.client()
    today = day_of(time.time())
    day = today - 3
    key = new_key()
    try:
        await limiter.hit(f"{key}:soccer", None, None, 2, "pro")  # fixes the sets' layout
        # 300,000 subscriptions that day without a day hash (nothing to export) but two, in
        # an order a plain string sort would get wrong ("a.b" sorts before "a" then).
        _other_subscriptions(admin, [f"gw:subs:day:{day_text(day)}"], 300_000)
        admin.sadd(f"gw:subs:day:{day_text(day)}", "zz.a:soccer", "zz:soccer")
        for subject in ("zz.a:soccer", "zz:soccer"):
            admin.hset(f"gw:{{{subject}}}:d:{day_text(day)}", mapping={"r:pro": 1, "u:pro": 1})
        worst = 0.0
        running = True

        async def tick() -> None:
            nonlocal worst
            while running:
                before = time.perf_counter()
                await asyncio.sleep(0.005)
                worst = max(worst, time.perf_counter() - before - 0.005)

        ticker = asyncio.create_task(tick())
        try:
            lines = [line async for batch in limiter.export(day, day) for line in batch]
        finally:
            running = False
            await ticker
        assert [line.subject for line in lines] == ["zz:soccer", "zz.a:soccer"]
        assert worst < 0.5, worst  # the whole sort of such a day took 1.5 s
    finally:
        admin.close()
        await limiter.close()


async def test_a_day_whose_recording_failed_is_exported_without_another_admission(
    fresh_redis_server: RedisServer,
) -> None:
    """The day's first admission of a subscription is recorded in the day's set in the
    background; when that failed (a Redis stalled, restarting or failing over just then), it
    was tried again only on the subscription's next admission in the same process. A key with
    one request that day (or whose later requests went to other workers, which had recorded it
    on an earlier day) had its history counted in Redis and was missing from the export."""
    limiter = create_limiter(StorageConfig(url=fresh_redis_server.url, timeout=0.25))
    admin = fresh_redis_server.client()
    key = new_key()
    today = day_of(time.time())
    day_set = f"gw:subs:day:{day_text(today)}"
    expected = [DayUsage(today, f"{key}:soccer", "pro", 1, 2)]
    admin.set(day_set, "not a set")  # the day's set cannot take the recording now
    try:
        await limiter.hit(f"{key}:soccer", None, None, 2, "pro")
        await asyncio.sleep(0.2)  # the recording has failed
        admin.delete(day_set)  # the storage is well again; no other admission comes
        deadline = time.monotonic() + 5
        while (
            days := [line async for b in limiter.export(today, today) for line in b]
        ) != expected:
            assert time.monotonic() < deadline, days
            await asyncio.sleep(0.1)
    finally:
        admin.close()
        await limiter.close()


async def test_a_late_recording_of_an_earlier_day_keeps_the_keys_history_as_long(
    redis_server: RedisServer,
) -> None:
    """Each recording set the key's set of products to expire with its own day's history: one
    retried after midnight for the day before shortened it by a day, and the key's history
    lost its last day a day early."""
    limiter = RedisLimiter(open_storage_redis(redis_server.url, 2.0), 2.0)
    admin = redis_server.client()
    key = new_key()
    try:
        await limiter.hit(f"{key}:soccer", None, None, 1, "pro")  # today's recording
        await limiter._registry.settled()
        kept = admin.pttl(f"gw:subs:key:{key}")
        assert kept > (HISTORY_DAYS - 1) * 86_400_000
        limiter._registry.forget(f"{key}:soccer", day_of(time.time()) - 1)  # yesterday's
        deadline = time.monotonic() + 10
        while limiter._registry._retries:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert admin.pttl(f"gw:subs:key:{key}") > kept - 60_000
    finally:
        admin.close()
        await limiter.close()


async def test_subscriptions_recorded_by_gateways_of_the_old_layout_are_found(
    fresh_redis_server: RedisServer,
) -> None:
    """A storage written by gateways that kept only the set of every subscription: the history
    they recorded is still found, by a key's history and by the export."""
    admin = fresh_redis_server.client()
    today = day_of(time.time())
    key = new_key()
    admin.sadd("gw:subscriptions", f"{key}:soccer")  # as an older gateway recorded it
    admin.hset(f"gw:{{{key}:soccer}}:d:{day_text(today)}", mapping={"r:pro": 3, "u:pro": 5})
    expected = [DayUsage(today, f"{key}:soccer", "pro", 3, 5)]
    limiter = create_limiter(StorageConfig(url=fresh_redis_server.url, timeout=2.0))
    try:
        assert await limiter.history(key, today - 1, today) == expected
        assert [line async for batch in limiter.export(today, today) for line in batch] == expected
        # And what this gateway admits that day on is found too.
        await limiter.hit(f"{key}:weather", None, None, 1, "pro")
        weather = DayUsage(today, f"{key}:weather", "pro", 1, 1)
        assert await limiter.history(key, today, today) == [*expected, weather]
        # On the upgrade's day the old set is written too, for the older gateways still
        # running, which read only it.
        assert admin.sismember("gw:subscriptions", f"{key}:weather")
    finally:
        admin.close()
        await limiter.close()


async def test_export_is_sorted_by_day_key_product(tmp_path: Path) -> None:
    # Its own storage, so that nothing else's history shows.
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        for made in (MemoryLimiter(), create_limiter(StorageConfig(url=server.url, timeout=2.0))):
            try:
                for subject in ("b:x", "a.b:y", "a:z", "a:b", "b:a"):
                    await made.hit(subject, None, None, 3, "plan")
                today = day_of(time.time())
                lines = [line async for batch in made.export(today - 1, today) for line in batch]
                assert [line.subject for line in lines] == ["a:b", "a:z", "a.b:y", "b:a", "b:x"]
                assert {(line.requests, line.units) for line in lines} == {(1, 3)}
            finally:
                await made.close()
    finally:
        server.stop()


async def test_refund_after_a_restart_neither_goes_negative_nor_takes_new_units(
    fresh_redis_server: RedisServer,
) -> None:
    limiter = create_limiter(StorageConfig(url=fresh_redis_server.url, timeout=1.0))
    try:
        key = new_key()
        subject = f"{key}:soccer"
        rule = quota(100)
        before = [await limiter.hit(subject, None, rule, 4, "pro") for _ in range(3)]
        # Redis restarts (nothing persisted) while the three are in flight...
        fresh_redis_server.stop()
        fresh_redis_server.start()
        after = await _hit_when_back(limiter, subject, rule)
        # ... and their refunds arrive now: the counters they went into are gone.
        for decision in before:
            assert decision.receipt is not None
            assert await limiter.refund(subject, decision.receipt) == 0
        usage = await limiter.usage(subject, rule)
        assert usage.used == 4  # the one admitted after the restart still counts
        today = day_of(time.time())
        assert await limiter.history(key, today, today) == [DayUsage(today, subject, "pro", 1, 4)]
        # Its own refund works, once.
        assert after.receipt is not None
        assert await limiter.refund(subject, after.receipt) == 4
        assert await limiter.refund(subject, after.receipt) == 0
        assert (await limiter.usage(subject, rule)).used == 0
    finally:
        await limiter.close()


async def test_a_refund_the_storage_does_not_answer_is_a_storage_error_too(
    fresh_redis_server: RedisServer,
) -> None:
    """Counted twice, as the README lists it: a refund that failed
    (gateway_quota_refunds_total{result="error"}) and a storage call that failed
    (gateway_storage_errors_total{operation="refund"}). And what it counts holds: the refund
    was written before the freeze was noticed, so Redis runs it when it wakes, after its
    deadline, and gives nothing back."""
    storage_errors: list[str] = []
    refunds: list[tuple[str, str, str, int]] = []
    timeout = 0.25
    limiter = create_limiter(
        StorageConfig(url=fresh_redis_server.url, timeout=timeout), storage_errors.append
    )
    settle = Refunds(lambda *counted: refunds.append(counted))
    try:
        subject = f"{new_key()}:soccer"
        decision = await limiter.hit(subject, None, quota(100), 3, "pro")
        assert decision.receipt is not None
        fresh_redis_server.pause()
        started = time.monotonic()
        settle.start(limiter, subject, decision.receipt, "soccer", timeout)
        await settle.drain()
        assert time.monotonic() - started < 8 * timeout  # loose: a busy CI box
        assert refunds == [("soccer", "pro", "error", 3)]
        assert [error for error in storage_errors if error != "register"] == ["refund"]
        fresh_redis_server.resume()
        await asyncio.sleep(0.2)  # for the refund buffered in Redis's socket to run
        await _hit_when_back(limiter, subject, quota(100))  # 4 units, once Redis answers
        assert (await limiter.usage(subject, quota(100))).used == 3 + 4
    finally:
        fresh_redis_server.resume()
        await limiter.close()


async def test_a_refund_a_frozen_cluster_node_runs_late_gives_nothing_back(
    tmp_path: Path,
) -> None:
    """The same on a Redis Cluster, where the deadline is on the clock of the node that holds
    the subject."""
    cluster = RedisClusterNodes(tmp_path / "cluster")
    cluster.start()
    limiter = create_limiter(StorageConfig(url=cluster.url, timeout=0.25))
    try:
        subject = f"{new_key()}:soccer"
        # One refund that goes through first, so the node has the script: a late EVALSHA of a
        # script it lacks would take nothing whatever the deadline.
        loaded = await limiter.hit(subject, None, quota(100), 3, "pro")
        assert loaded.receipt is not None
        assert await limiter.refund(subject, loaded.receipt) == 3
        decision = await limiter.hit(subject, None, quota(100), 3, "pro")
        assert decision.receipt is not None
        for node in cluster.nodes:
            node.pause()
        try:
            with pytest.raises(StorageError):
                await limiter.refund(subject, decision.receipt)
        finally:
            for node in cluster.nodes:
                node.resume()
        await asyncio.sleep(0.2)  # for the refund buffered in the node's socket to run
        await _hit_when_back(limiter, subject, quota(100))  # 4 units, once the node answers
        assert (await limiter.usage(subject, quota(100))).used == 3 + 4
    finally:
        await limiter.close()
        cluster.stop()


async def test_a_gateway_whose_clock_lags_redis_still_counts(redis_server: RedisServer) -> None:
    """Its period ends (by its own clock) before Redis's now: the counter it creates must not
    expire at once, or every hit would find it empty and the quota would not hold."""
    lag = 200.0  # past a minute's end and its 60 s of grace
    lagging = RedisLimiter(
        open_storage_redis(redis_server.url, 2.0), 2.0, clock=lambda: time.time() - lag
    )
    try:
        subject = f"{new_key()}:soccer"
        rule = QuotaRule(2, "minute", UTC, frozenset())  # type: ignore[arg-type]
        outcomes = [(await lagging.hit(subject, None, rule, 1, "pro")).outcome for _ in range(4)]
        assert outcomes == ["allowed", "allowed", "quota_exceeded", "quota_exceeded"]
        credited = (await lagging.credit(subject, rule, 1)).usage
        assert (credited.used, credited.limit) == (2, 3)
    finally:
        await lagging.close()


async def test_prepared_checks_are_kept_for_the_subjects_of_the_current_day_only(
    redis_server: RedisServer,
) -> None:
    """Each subject's check is prepared once and kept; a deleted key's is never used again,
    so at the latest the day's end lets it go (it stayed until 10,000 were kept)."""
    now = [time.time()]
    limiter = RedisLimiter(open_storage_redis(redis_server.url, 2.0), 2.0, clock=lambda: now[0])
    try:
        rule = quota(100)
        gone = [f"{new_key()}:soccer" for _ in range(3)]
        for subject in gone:
            assert (await limiter.hit(subject, None, rule)).allowed
        assert set(limiter._commands) == set(gone)
        now[0] += 86400
        staying = f"{new_key()}:soccer"
        assert (await limiter.hit(staying, None, rule)).allowed
        assert set(limiter._commands) == {staying}
        assert (await limiter.usage(staying, rule)).used == 1
    finally:
        await limiter.close()


async def _hit_when_back(limiter: Limiter, subject: str, rule: QuotaRule) -> object:
    deadline = time.monotonic() + 10
    while True:
        try:
            return await limiter.hit(subject, None, rule, 4, "pro")
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


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
                *(limiter.hit(subject, rate, rule(), cost, "pro") for cost in costs)
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
