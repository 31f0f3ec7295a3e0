"""The sets that name the subscriptions with history (gateway/limits/redis_registry.py), in a
real redis-server, Sentinel group and Redis Cluster: the admission that begins a subscription's
day finds them written by its reply, so no moment after it leaves the day out of the billing
export. On one server the hit script writes them with the day's counts; on a cluster (other
slots) the process writes them before the hit, on a subscription's first admission of the day.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from gateway.limits.base import DAY_SECONDS, HISTORY_DAYS, DayUsage, day_of, day_text
from gateway.limits.redis import RedisLimiter
from gateway.limits.redis_clients import open_storage_redis
from tests.support.limiter_backends import Backend, quota_rule, redis_backend_of
from tests.support.redis_servers import RedisClusterNodes


@pytest.fixture(params=["redis", "sentinel", "cluster"])
def storage(request: pytest.FixtureRequest) -> Backend:
    return redis_backend_of(request, request.param)


def _index(inspector: Any, subject: str, day: int) -> tuple[bool, bool]:
    """Whether the day's set and the key's set name `subject`."""
    key_name, _, product = subject.partition(":")
    return (
        bool(inspector.sismember(f"gw:subs:day:{day_text(day)}", subject)),
        bool(inspector.sismember(f"gw:subs:key:{key_name}", product)),
    )


async def test_the_day_index_is_in_redis_with_the_reply_that_began_the_day(
    storage: Backend, new_subject: Callable[[], str]
) -> None:
    """The sets were written in the background after the hit's reply: a worker killed (SIGKILL,
    OOM) in between, or a Redis failing just then, left the subscription out of that day's
    export and its key's history for good, though the day's hash counted its requests (the
    customer was not billed). What Redis holds when the reply is read, before the event loop
    runs anything else, is what a worker killed then leaves."""
    now = time.time()
    today = day_of(now)
    limiter = RedisLimiter(open_storage_redis(storage.url, 2.0), 2.0, clock=lambda: now)
    inspector = storage.inspector()
    first, second = new_subject(), new_subject()
    try:
        # The process's first admission: the old set's layout is learnt in the background.
        assert (await limiter.hit(first, None, None, 2, "pro")).allowed
        in_redis_at_reply = _index(inspector, first, today)
        await limiter._registry.settled()
        assert (await limiter.hit(second, None, None, 2, "pro")).allowed
        second_at_reply = _index(inspector, second, today)
        recording_after = len(limiter._registry._recording)
        # On a cluster (other slots than the subscription's) written before the hit: they were
        # written after its reply, and a worker killed in between left them out.
        assert in_redis_at_reply == second_at_reply == (True, True)
        # ... and nothing is left for the background to write (no old set here).
        assert recording_after == 0
        # Kept as long as the day's history, as the background write keeps them.
        kept_until_ms = (today + 1 + HISTORY_DAYS) * DAY_SECONDS * 1000
        for name in (
            f"gw:subs:day:{day_text(today)}",
            f"gw:subs:key:{first.partition(':')[0]}",
            f"gw:{{{first}}}:d:{day_text(today)}",
        ):
            expires_in = inspector.pttl(name)
            assert abs(time.time() * 1000 + expires_in - kept_until_ms) < 60_000, name
        # The next admissions that day add nothing to the sets, and the export finds both.
        assert (await limiter.hit(second, None, None, 1, "pro")).allowed
        lines = [
            line
            async for batch in limiter.export(today, today)
            for line in batch
            if line.subject in (first, second)
        ]
        assert sorted(lines, key=lambda line: line.subject) == sorted(
            [DayUsage(today, first, "pro", 1, 2), DayUsage(today, second, "pro", 2, 3)],
            key=lambda line: line.subject,
        )
    finally:
        inspector.close()
        await limiter.close()


async def test_a_refused_first_admission_costs_the_export_nothing(
    storage: Backend, new_subject: Callable[[], str]
) -> None:
    """On a cluster the sets are written before the hit, which may then refuse the request:
    they name a subscription with no history that day, which the export and the key's history
    pass over."""
    today = day_of(time.time())
    limiter = storage.limiter()
    inspector = storage.inspector()
    subject = new_subject()
    try:
        refused = await limiter.hit(subject, None, quota_rule(1), 2, "pro")  # costs more than all
        assert refused.outcome == "quota_exceeded"
        written = (True, True) if storage.kind == "cluster" else (False, False)
        assert _index(inspector, subject, today) == written
        assert await limiter.history(subject.partition(":")[0], today, today) == []
        assert [
            line
            async for batch in limiter.export(today, today)
            for line in batch
            if line.subject == subject
        ] == []
    finally:
        inspector.close()
        await limiter.close()


async def test_a_days_later_admissions_write_no_sets(
    storage: Backend, new_subject: Callable[[], str]
) -> None:
    """The sets cost a round trip before the hit on a cluster: on the subscription's first
    admission of the day in this process, never on the later ones. (Taken away here after the
    first, they stay away.)"""
    now = time.time()
    today = day_of(now)
    limiter = RedisLimiter(open_storage_redis(storage.url, 2.0), 2.0, clock=lambda: now)
    inspector = storage.inspector()
    subject = new_subject()
    key_name, _, product = subject.partition(":")
    try:
        assert (await limiter.hit(subject, None, None, 1, "pro")).allowed
        await limiter._registry.settled()
        assert _index(inspector, subject, today) == (True, True)
        inspector.srem(f"gw:subs:day:{day_text(today)}", subject)
        inspector.srem(f"gw:subs:key:{key_name}", product)
        for _ in range(3):
            assert (await limiter.hit(subject, None, None, 1, "pro")).allowed
            assert _index(inspector, subject, today) == (False, False)
        await limiter._registry.settled()
        assert _index(inspector, subject, today) == (False, False)
    finally:
        inspector.close()
        await limiter.close()


async def test_the_sets_written_before_a_hit_are_those_of_the_day_it_counts_in(
    storage: Backend, new_subject: Callable[[], str]
) -> None:
    """The gateway's clock decides a hit's day. A hit read just before midnight UTC counts in
    that day even when midnight passes while its sets are written: the sets written are that
    day's. The first admission after midnight writes the next day's."""
    midnight = day_of(time.time()) * DAY_SECONDS
    yesterday, today = day_of(midnight - 1), day_of(midnight)
    # The hit reads the clock first (23:59:59.95), everything after it reads 00:00:00.05.
    readings = iter([midnight - 0.05])
    limiter = RedisLimiter(
        open_storage_redis(storage.url, 2.0), 2.0, clock=lambda: next(readings, midnight + 0.05)
    )
    inspector = storage.inspector()
    subject = new_subject()
    try:
        assert (await limiter.hit(subject, None, None, 1, "pro")).allowed
        at_reply = (_index(inspector, subject, yesterday), _index(inspector, subject, today))
        assert at_reply == ((True, True), (False, True))  # the key's set is one for all days
        assert inspector.hget(f"gw:{{{subject}}}:d:{day_text(yesterday)}", "r:pro") == b"1"
        assert (await limiter.hit(subject, None, None, 1, "pro")).allowed
        assert _index(inspector, subject, today) == (True, True)
        assert inspector.hget(f"gw:{{{subject}}}:d:{day_text(today)}", "r:pro") == b"1"
    finally:
        inspector.close()
        await limiter.close()


async def test_a_failed_write_of_the_sets_leaves_the_admission_as_it_was(
    redis_cluster: RedisClusterNodes, new_subject: Callable[[], str]
) -> None:
    """On a cluster the sets are written before the hit. When the storage refuses that write
    (here the key's set is a key of another type) the admission goes on as it did before that
    write was made: the hit decides, and the sets are written after its reply, again until
    they are in. No new way to fail an admission."""
    storage = Backend("cluster", redis_cluster.url)
    today = day_of(time.time())
    limiter = storage.limiter()
    inspector = storage.inspector()
    subject = new_subject()
    key_name = subject.partition(":")[0]
    try:
        inspector.set(f"gw:subs:key:{key_name}", "not a set")
        assert (await limiter.hit(subject, None, None, 1, "pro")).allowed
        # Counted as it failed, before the reply.
        assert storage.errors == ["register"]
        inspector.delete(f"gw:subs:key:{key_name}")
        deadline = time.monotonic() + 10  # the retries after 0.5 s, 1 s, 2 s ...
        while not await limiter.history(key_name, today, today):
            assert time.monotonic() < deadline, "the sets were never written"
            await asyncio.sleep(0.05)
        assert _index(inspector, subject, today) == (True, True)
        assert await limiter.history(key_name, today, today) == [
            DayUsage(today, subject, "pro", 1, 1)
        ]
    finally:
        inspector.close()
        await limiter.close()
