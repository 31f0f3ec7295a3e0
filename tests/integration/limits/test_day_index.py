"""The sets that name the subscriptions with history (gateway/limits/redis_registry.py), in a
real redis-server, Sentinel group and Redis Cluster: on one server the hit script writes them
with the admission that begins a subscription's day, so no moment after its reply leaves the
day out of the billing export; on a cluster (other slots) the process writes them after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from gateway.limits.base import DAY_SECONDS, HISTORY_DAYS, DayUsage, day_of, day_text
from gateway.limits.redis import RedisLimiter
from gateway.limits.redis_clients import open_storage_redis
from tests.support.limiter_backends import Backend, redis_backend_of


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
        if storage.kind == "cluster":
            # Other slots than the subscription's: written after the reply, as before.
            assert in_redis_at_reply == second_at_reply == (False, False)
            await limiter._registry.settled()
        else:
            assert in_redis_at_reply == second_at_reply == (True, True)
            # ... and nothing is left for the background to write (no old set here).
            assert recording_after == 0
        assert _index(inspector, first, today) == _index(inspector, second, today) == (True, True)
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
