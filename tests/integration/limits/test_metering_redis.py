"""Metering in a real redis-server or Redis Cluster when Redis does what memory never does:
a refund after a restart neither goes negative nor takes new units, a refund unanswered is a
storage error and one a frozen node runs late gives nothing back; a gateway whose clock lags
still counts, and prepared checks are kept for the current day's subjects only.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.config.model import QuotaRule, StorageConfig
from gateway.limits import Limiter, create_limiter
from gateway.limits.base import DayUsage, StorageError, day_of
from gateway.limits.metering import Settlements
from gateway.limits.redis import RedisLimiter
from gateway.limits.redis_clients import open_storage_redis
from tests.support.metering_quotas import UTC, new_key, quota
from tests.support.redis_servers import RedisClusterNodes, RedisServer


async def test_refund_after_a_restart_neither_goes_negative_nor_takes_new_units(
    fresh_redis_server: RedisServer,
) -> None:
    limiter = create_limiter(StorageConfig(url=fresh_redis_server.url, timeout=1.0))
    try:
        key = new_key()
        subject = f"{key}:soccer"
        rule = quota(100)
        before = [await limiter.hit(subject, None, rule, 4, "pro", settles=True) for _ in range(3)]
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


@pytest.mark.parametrize(("change", "operation"), [(-3, "refund"), (20, "charge")])
async def test_a_settlement_the_storage_does_not_answer_is_a_storage_error_too(
    fresh_redis_server: RedisServer,
    change: int,
    operation: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Counted twice, as the README lists it: a refund (or charge) that failed
    (gateway_quota_refunds_total{result="error"}, or gateway_quota_charges_total) and a
    storage call that failed (gateway_storage_errors_total{operation="refund"} or "charge").
    And what it counts holds: the call was written before the freeze was noticed, so Redis runs
    it when it wakes, after its deadline, and moves nothing."""
    storage_errors: list[str] = []
    counted: dict[str, list[tuple[str, str, str, int]]] = {"refund": [], "charge": []}
    timeout = 0.25
    limiter = create_limiter(
        StorageConfig(url=fresh_redis_server.url, timeout=timeout), storage_errors.append
    )
    settle = Settlements(
        lambda *units: counted["refund"].append(units),
        lambda *units: counted["charge"].append(units),
    )
    try:
        subject = f"{new_key()}:soccer"
        decision = await limiter.hit(subject, None, quota(100), 3, "pro", None, True)
        assert decision.receipt is not None
        fresh_redis_server.pause()
        started = time.monotonic()
        settle.start(limiter, subject, decision.receipt, "soccer", timeout, change, "req-17")
        await settle.drain()
        assert "(request req-17)" in caplog.text  # the request its warning is about
        assert time.monotonic() - started < 8 * timeout  # loose: a busy CI box
        assert counted[operation] == [("soccer", "pro", "error", abs(change))]
        assert len(counted["refund"]) + len(counted["charge"]) == 1
        assert [error for error in storage_errors if error != "register"] == [operation]
        fresh_redis_server.resume()
        await asyncio.sleep(0.2)  # for the call buffered in Redis's socket to run
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
        loaded = await limiter.hit(subject, None, quota(100), 3, "pro", settles=True)
        assert loaded.receipt is not None
        assert await limiter.refund(subject, loaded.receipt) == 3
        decision = await limiter.hit(subject, None, quota(100), 3, "pro", settles=True)
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
        outcomes = [
            (await lagging.hit(subject, None, rule, 1, "pro", settles=True)).outcome
            for _ in range(4)
        ]
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
            return await limiter.hit(subject, None, rule, 4, "pro", settles=True)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
