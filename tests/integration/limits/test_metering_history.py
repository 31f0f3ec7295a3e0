"""Metering's history and export in a real redis-server: the days kept read in one round
trip, what is answered whatever the storage holds, a day of many subscriptions exported
without holding the event loop, days whose recording failed or came late, subscriptions of
the old layout, and the export's order.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.config.model import StorageConfig
from gateway.limits import create_limiter
from gateway.limits.base import HISTORY_DAYS, DayUsage, day_of, day_text
from gateway.limits.memory import MemoryLimiter
from gateway.limits.redis import RedisLimiter
from gateway.limits.redis_clients import open_storage_redis
from tests.support.metering_quotas import new_key
from tests.support.redis_servers import RedisServer


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
    background (on a cluster; on one server when its check could not write the set itself, as
    here); when that failed (a Redis stalled, restarting or failing over just then), it was
    tried again only on the subscription's next admission in the same process. A key with one
    request that day (or whose later requests went to other workers, which had recorded it on
    an earlier day) had its history counted in Redis and was missing from the export. And a
    day's set the check cannot write fails no admission."""
    limiter = create_limiter(StorageConfig(url=fresh_redis_server.url, timeout=0.25))
    admin = fresh_redis_server.client()
    key = new_key()
    today = day_of(time.time())
    day_set = f"gw:subs:day:{day_text(today)}"
    expected = [DayUsage(today, f"{key}:soccer", "pro", 1, 2)]
    admin.set(day_set, "not a set")  # the day's set cannot take the recording now
    try:
        assert (await limiter.hit(f"{key}:soccer", None, None, 2, "pro")).allowed
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
        # And what this gateway admits that day on is found too: in the day's and the key's
        # sets as the check answers (the old set is written after it, below).
        await limiter.hit(f"{key}:weather", None, None, 1, "pro")
        assert admin.sismember(f"gw:subs:day:{day_text(today)}", f"{key}:weather")
        assert admin.sismember(f"gw:subs:key:{key}", "weather")
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
