"""One suite for every limit storage: memory, a real redis-server and a real Redis Cluster.

Windows are short (a fraction of a second) so that sliding behaviour shows without long
sleeps; timing assertions leave room for a busy two-core machine.
"""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis
import redis.cluster
import redis.crc

from gateway.config.model import QuotaPeriod, QuotaRule, RateRule, StorageConfig
from gateway.limits import Decision, Limiter, StorageError, create_limiter
from gateway.limits.base import day_of
from gateway.limits.periods import quota_period
from gateway.limits.redis_layout import day_key, quota_key, rate_key
from tests.support.redis_servers import (
    RedisClusterNodes,
    RedisSentinelGroup,
    RedisServer,
    TlsRedisServer,
    tls_unavailable,
)

UTC = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")


def rate_rule(limit: int, window: float) -> RateRule:
    return RateRule(limit=limit, window=window, per=f"{window}s")


def quota_rule(limit: int, per: QuotaPeriod = "month", tz: ZoneInfo = UTC) -> QuotaRule:
    return QuotaRule(limit=limit, per=per, timezone=tz)


@dataclass
class Backend:
    kind: str
    url: str
    errors: list[str] = field(default_factory=list)
    sentinel: RedisSentinelGroup | None = None

    def limiter(self, timeout: float = 2.0) -> Limiter:
        return create_limiter(StorageConfig(url=self.url, timeout=timeout), self.errors.append)

    def inspector(self) -> Any:
        """A plain synchronous client, to look at the keys the limiter wrote."""
        if self.kind == "cluster":
            host_port = self.url.removeprefix("redis+cluster://")
            host, port = host_port.split(":")
            return redis.cluster.RedisCluster(host=host, port=int(port), socket_timeout=5)
        if self.kind == "sentinel":
            assert self.sentinel is not None
            return redis.Redis(port=self.sentinel.master_port(), socket_timeout=5)
        return redis.Redis.from_url(self.url, socket_timeout=5)


def redis_backend_of(request: pytest.FixtureRequest, kind: str) -> Backend:
    # Servers are asked for lazily, so `-k memory` starts no Redis at all.
    if kind == "sentinel":
        group: RedisSentinelGroup = request.getfixturevalue("redis_sentinel")
        return Backend("sentinel", group.url, sentinel=group)
    fixture = "redis_server" if kind == "redis" else "redis_cluster"
    return Backend(kind, request.getfixturevalue(fixture).url)


@pytest.fixture(params=["memory", "redis", "cluster", "sentinel"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "memory":
        return Backend("memory", "memory://")
    return redis_backend_of(request, request.param)


@pytest.fixture(params=["redis", "cluster", "sentinel"])
def redis_backend(request: pytest.FixtureRequest) -> Backend:
    return redis_backend_of(request, request.param)


@pytest.fixture
async def limiter(backend: Backend) -> AsyncIterator[Limiter]:
    limiter = backend.limiter()
    yield limiter
    await limiter.close()


@pytest.fixture
def new_subject() -> Callable[[], str]:
    """Subjects shaped like the real ones ("<key name>:<product>") and unique per call."""

    def make() -> str:
        return f"key-{uuid.uuid4().hex[:12]}.test:product-a"

    return make


@pytest.fixture
def subject(new_subject: Callable[[], str]) -> str:
    return new_subject()


async def hits(limiter: Limiter, subject: str, count: int, **rules: Any) -> list[Decision]:
    return [await limiter.hit(subject, rules.get("rate"), rules.get("quota")) for _ in range(count)]


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


# Redis only ---------------------------------------------------------------------------------


@pytest.fixture
def inspector(redis_backend: Backend) -> Iterator[Any]:
    client = redis_backend.inspector()
    yield client
    client.close()


async def test_keys_expire_on_their_own(
    redis_backend: Backend, inspector: Any, subject: str
) -> None:
    limiter = redis_backend.limiter()
    try:
        rate, quota = rate_rule(5, 0.3), quota_rule(5, per="day")
        await limiter.hit(subject, rate, quota)
        start, end = quota_period(time.time(), "day", UTC)
        assert 0 < inspector.pttl(rate_key(subject)) <= 301
        # The quota counter outlives its period by a grace minute.
        quota_ttl = inspector.pttl(quota_key(subject, start)) / 1000
        assert quota_ttl == pytest.approx(end + 60 - time.time(), abs=2)
        # Set when the period's counter is created; later hits leave it (one command fewer).
        await limiter.hit(subject, rate, quota)
        assert inspector.hget(quota_key(subject, start), "used") in (b"2", "2")
        quota_ttl = inspector.pttl(quota_key(subject, start)) / 1000
        assert quota_ttl == pytest.approx(end + 60 - time.time(), abs=2)
        await asyncio.sleep(0.4)
        assert inspector.exists(rate_key(subject)) == 0
    finally:
        await limiter.close()


async def test_script_cache_loss_is_survived(
    redis_backend: Backend, inspector: Any, subject: str
) -> None:
    limiter = redis_backend.limiter()
    try:
        assert (await limiter.hit(subject, rate_rule(5, 10), None)).allowed
        inspector.script_flush()
        second = await limiter.hit(subject, rate_rule(5, 10), None)
        assert second.allowed and second.rate is not None and second.rate.remaining == 3
        assert redis_backend.errors == []
    finally:
        await limiter.close()


STORAGE_TIMEOUT = 0.25
# How late an error may come on top of the storage timeout on a busy machine.
MARGIN = 0.25


async def admitted(limiter: Limiter, subject: str, quota: QuotaRule) -> bool:
    """A hit that is not the one under test, with STORAGE_TIMEOUT: on a busy two-core machine
    (three cluster nodes, the test, the suite) it may miss its deadline. Tried again then: a
    hit that ran late took nothing, which these tests check themselves, so no count moves."""
    for _ in range(5):
        try:
            return (await limiter.hit(subject, None, quota)).allowed
        except StorageError:
            await asyncio.sleep(0.05)
    return (await limiter.hit(subject, None, quota)).allowed


async def test_dead_redis_fails_fast_and_is_reconnected(
    fresh_redis_server: RedisServer, subject: str
) -> None:
    backend = Backend("redis", fresh_redis_server.url)
    limiter = backend.limiter(timeout=STORAGE_TIMEOUT)
    rate, quota = rate_rule(100, 10), quota_rule(100)
    try:
        assert (await limiter.hit(subject, rate, quota)).allowed
        fresh_redis_server.stop()

        calls = {
            "hit": lambda: limiter.hit(subject, rate, quota),
            "usage": lambda: limiter.usage(subject, quota),
            "reset": lambda: limiter.reset_quota(subject, quota),
            "ping": limiter.ping,
        }
        for operation, call in calls.items():
            started = time.monotonic()
            with pytest.raises(StorageError):
                await call()
            assert time.monotonic() - started < STORAGE_TIMEOUT + MARGIN
            assert backend.errors[-1] == operation

        fresh_redis_server.start()  # same port, empty, without the script
        after = await limiter.hit(subject, rate, quota)
        assert after.allowed and after.quota is not None and after.quota.remaining == 99
        await limiter.ping()
    finally:
        await limiter.close()


async def test_frozen_redis_times_out_and_recovers(
    fresh_redis_server: RedisServer, subject: str
) -> None:
    backend = Backend("redis", fresh_redis_server.url)
    limiter = backend.limiter(timeout=STORAGE_TIMEOUT)
    rate = rate_rule(100, 10)
    try:
        assert (await limiter.hit(subject, rate, None)).allowed
        fresh_redis_server.pause()
        for call in (lambda: limiter.hit(subject, rate, None), limiter.ping):
            started = time.monotonic()
            with pytest.raises(StorageError, match="timed out"):
                await call()
            assert time.monotonic() - started < STORAGE_TIMEOUT + MARGIN
        # (The first hit's recording of the subscription for the export may have timed out
        # too on a busy machine; it does not fail the hit.)
        assert [error for error in backend.errors if error != "register"] == ["hit", "ping"]
        fresh_redis_server.resume()
        assert (await limiter.hit(subject, rate, None)).allowed
    finally:
        fresh_redis_server.resume()
        await limiter.close()


async def test_hits_refused_while_redis_is_frozen_are_not_taken_when_it_wakes(
    fresh_redis_server: RedisServer, subject: str
) -> None:
    """A frozen Redis's kernel still accepts connections. Hits written into them would run
    when Redis wakes, charging requests that were answered 503; they wait for a PING instead.
    And a hit written before the freeze was noticed runs when Redis wakes, after its deadline
    on Redis's clock: it takes nothing either."""
    backend = Backend("redis", fresh_redis_server.url)
    limiter = backend.limiter(timeout=STORAGE_TIMEOUT)
    quota = quota_rule(100)
    try:
        assert (await limiter.hit(subject, None, quota)).allowed
        fresh_redis_server.pause()
        # The first was written before the freeze was noticed: Redis will run it, too late to
        # take anything. The others each found the connection aborted and opened a new one.
        for _ in range(3):
            with pytest.raises(StorageError, match="timed out"):
                await limiter.hit(subject, None, quota)
        fresh_redis_server.resume()
        after = await limiter.hit(subject, None, quota)
        assert after.allowed
        await asyncio.sleep(0.2)  # for any hit still buffered in Redis's sockets to run
        assert (await limiter.usage(subject, quota)).used == 2  # the first and the last
    finally:
        fresh_redis_server.resume()
        await limiter.close()


async def test_a_hit_written_behind_one_that_timed_out_is_charged_only_if_admitted(
    fresh_redis_server: RedisServer, subject: str
) -> None:
    """Redis freezes; a hit is written, and another on the same connection just before the
    first one's deadline. The first times out; the second was failed with it, at once (its
    request answered 503), though its own deadline on Redis's clock was still ahead: Redis
    woke within it, ran it and took its units. A charge for a refused request (a soak: 1-3
    per key per 3,000 requests with Redis frozen for 0.5 s now and then)."""
    backend = Backend("redis", fresh_redis_server.url)
    limiter = backend.limiter(timeout=STORAGE_TIMEOUT)
    quota = quota_rule(100)
    try:
        assert (await limiter.hit(subject, None, quota)).allowed  # connected, Redis's clock known
        fresh_redis_server.pause()
        first = asyncio.ensure_future(limiter.hit(subject, None, quota))
        await asyncio.sleep(STORAGE_TIMEOUT * 0.7)
        second = asyncio.ensure_future(limiter.hit(subject, None, quota))
        await asyncio.sleep(STORAGE_TIMEOUT * 0.5)  # the first is past its deadline
        fresh_redis_server.resume()  # within the second's deadline on Redis's clock
        outcomes = await asyncio.gather(first, second, return_exceptions=True)
        assert isinstance(outcomes[0], StorageError)
        admitted = sum(isinstance(o, Decision) and o.allowed for o in outcomes)
        await asyncio.sleep(0.2)  # for any hit still buffered in Redis's sockets to run
        assert (await limiter.usage(subject, quota)).used == 1 + admitted, outcomes
    finally:
        fresh_redis_server.resume()
        await limiter.close()


async def test_hits_a_frozen_cluster_node_runs_late_take_nothing(
    tmp_path: Path, subject: str
) -> None:
    """The same on a Redis Cluster, where the deadline is on the clock of the node that holds
    the subject."""
    cluster = RedisClusterNodes(tmp_path / "cluster")
    cluster.start()
    backend = Backend("cluster", cluster.url)
    limiter = backend.limiter(timeout=STORAGE_TIMEOUT)
    quota = quota_rule(100)
    try:
        assert await admitted(limiter, subject, quota)
        for node in cluster.nodes:
            node.pause()
        try:
            with pytest.raises(StorageError, match="timed out"):
                await limiter.hit(subject, None, quota)
        finally:
            for node in cluster.nodes:
                node.resume()
        assert await admitted(limiter, subject, quota)
        await asyncio.sleep(0.2)  # for any hit still buffered in Redis's sockets to run
        assert (await limiter.usage(subject, quota)).used == 2  # the first and the last
    finally:
        await limiter.close()
        cluster.stop()


def node_holding(subject: str, nodes: int) -> int:
    """Which of `RedisClusterNodes`'s nodes holds a subject's keys (they share one hash tag)."""
    slot = redis.crc.key_slot(rate_key(subject).encode())
    return min(slot // (redis.crc.REDIS_CLUSTER_HASH_SLOTS // nodes), nodes - 1)


async def test_the_first_check_sent_to_a_cluster_node_takes_nothing_if_run_late(
    tmp_path: Path, subject: str
) -> None:
    """A node's clock is learnt from its TIME before any check is sent to it: a process's
    first check of a node that is frozen is not left to run when the node wakes."""
    cluster = RedisClusterNodes(tmp_path / "cluster")
    cluster.start()
    limiter = Backend("cluster", cluster.url).limiter(timeout=STORAGE_TIMEOUT)
    quota = quota_rule(100)
    frozen = cluster.nodes[node_holding(subject, len(cluster.nodes))]
    elsewhere = next(
        other
        for other in (f"{subject}-{i}" for i in range(100))
        if cluster.nodes[node_holding(other, len(cluster.nodes))] is not frozen
    )
    try:
        # The slot map is known, and another node's clock; not the frozen node's.
        assert await admitted(limiter, elsewhere, quota)
        frozen.pause()
        try:
            started = time.monotonic()
            with pytest.raises(StorageError, match="timed out"):
                await limiter.hit(subject, None, quota)
            # Answered within the storage timeout, its TIME included.
            assert time.monotonic() - started < STORAGE_TIMEOUT + MARGIN
        finally:
            frozen.resume()
        await asyncio.sleep(0.2)  # for anything buffered in the node's sockets to run
        assert (await limiter.usage(subject, quota)).used == 0
        assert await admitted(limiter, subject, quota)
        assert (await limiter.usage(subject, quota)).used == 1
    finally:
        await limiter.close()
        cluster.stop()


async def test_each_check_runs_once_while_its_slot_moves(tmp_path: Path) -> None:
    """A slot moved between masters under load (a resharding): redis-py closed every node's
    connection on every fifth MOVED and sent again the scripts that were on their way, which
    Redis had run already; an audit saw admissions charged twice and refunds given back twice,
    nothing counted. A check runs at most once: its day's count of requests is at least the
    admissions and at most the admissions and the failures."""
    cluster = RedisClusterNodes(tmp_path / "cluster")
    cluster.start()
    limiter = create_limiter(StorageConfig(url=cluster.url, timeout=0.5))
    moving = "moving-0.test:product"
    others = [f"staying-{i}.test:product" for i in range(6)]
    counts = {subject: [0, 0] for subject in (moving, *others)}  # admitted, failed
    stopping = asyncio.Event()

    async def keep_hitting(subject: str) -> None:
        while not stopping.is_set():
            try:
                decision = await limiter.hit(subject, None, None, 1, "p")
            except StorageError:
                counts[subject][1] += 1
            else:
                counts[subject][0] += decision.allowed

    slot = redis.crc.key_slot(moving.encode())
    source = cluster.owner_of(slot)
    target = (source + 1) % len(cluster.nodes)
    hitters = [asyncio.create_task(keep_hitting(s)) for s in [moving] * 8 + others * 2]
    try:
        for _ in range(4):
            await asyncio.sleep(0.1)
            await asyncio.to_thread(cluster.move_slot, slot, source, target)
            source, target = target, source
        stopping.set()
        await asyncio.gather(*hitters)
        today = day_of(time.time())
        inspector = redis.cluster.RedisCluster(
            host="127.0.0.1", port=cluster.port, socket_timeout=5
        )
        try:
            for subject, (admitted, failed) in counts.items():
                ran = int(inspector.hget(day_key(subject, today), "r:p") or 0)
                assert admitted <= ran <= admitted + failed, (subject, admitted, failed, ran)
        finally:
            inspector.close()
        assert counts[moving][0] > 0
    finally:
        stopping.set()
        await asyncio.gather(*hitters, return_exceptions=True)
        await limiter.close()
        cluster.stop()


async def test_a_cluster_node_that_forgot_the_script_runs_it_while_another_is_down(
    tmp_path: Path, subject: str
) -> None:
    """NOSCRIPT is answered by running the script on that node alone: loading it on every
    master failed (503) while any master was down, for subjects on the healthy ones."""
    cluster = RedisClusterNodes(tmp_path / "cluster")
    cluster.start()
    limiter = Backend("cluster", cluster.url).limiter(timeout=STORAGE_TIMEOUT)
    quota = quota_rule(100)
    holder = cluster.nodes[node_holding(subject, len(cluster.nodes))]
    other = next(node for node in cluster.nodes if node is not holder)
    try:
        assert await admitted(limiter, subject, quota)
        admin = holder.client()
        admin.script_flush()
        admin.close()
        other.pause()
        try:
            assert await admitted(limiter, subject, quota)  # never waits on `other`
        finally:
            other.resume()
        assert (await limiter.usage(subject, quota)).used == 2
    finally:
        await limiter.close()
        cluster.stop()


def server_stats(client: redis.Redis) -> dict[str, int]:
    stats = client.info("stats")
    commands = client.info("commandstats")
    return {
        "commands": stats["total_commands_processed"],
        "connections": stats["total_connections_received"],
        "evalsha": commands.get("cmdstat_evalsha", {}).get("calls", 0),
        "eval": commands.get("cmdstat_eval", {}).get("calls", 0),
        "script": commands.get("cmdstat_script", {}).get("calls", 0),
    }


def stats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    # Each measurement issues two INFO commands, counted in "commands" afterwards.
    delta = {name: after[name] - before[name] for name in before}
    delta["commands"] -= 2
    return delta


async def test_hits_of_one_tick_share_one_connection_in_few_writes(
    fresh_redis_server: RedisServer, new_subject: Callable[[], str]
) -> None:
    limiter = Backend("redis", fresh_redis_server.url).limiter()
    admin = fresh_redis_server.client()
    rate, quota = rate_rule(5, 10), quota_rule(5)
    subjects = [new_subject() for _ in range(51)]
    try:
        # Connects and loads the script; each subject's first hit also begins its history
        # of the day and records it for the export, which later hits of the day do not.
        for subject in subjects:
            await limiter.hit(subject, rate, quota)
        # (History waits for this process's recording of new subscriptions, done meanwhile
        # in the background: none may land inside the measurements.)
        await limiter.history("nobody", 0, 0)
        before = server_stats(admin)
        await limiter.hit(subjects[0], rate, quota)
        one = stats_delta(before, server_stats(admin))

        before = server_stats(admin)
        decisions = await asyncio.gather(
            *(limiter.hit(subject, rate, quota) for subject in subjects[1:])
        )
        many = stats_delta(before, server_stats(admin))
    finally:
        admin.close()
        await limiter.close()

    assert all(d.allowed for d in decisions)
    # In steady state a hit is one EVALSHA (Redis also counts the commands the script
    # runs inside, hence "commands" per hit is more than one)...
    assert (one["evalsha"], one["eval"], one["script"]) == (1, 0, 0)
    assert (many["evalsha"], many["eval"], many["script"]) == (50, 0, 0)
    # ...a batch costs nothing beyond its hits...
    assert many["commands"] == 50 * one["commands"]
    # ...and the 50 calls of one tick went over the one connection, pipelined in batches of
    # at most MAX_BATCH, where 50 concurrent single calls would have opened 49 more.
    assert many["connections"] == one["connections"] == 0


def test_an_unknown_storage_url_is_refused() -> None:
    with pytest.raises(ValueError, match="not a Redis URL"):
        create_limiter(StorageConfig(url="memcached://127.0.0.1:11211"))


async def test_the_url_credentials_database_and_client_name_are_used(
    fresh_redis_server: RedisServer, subject: str
) -> None:
    """The hits go over a connection of their own (gateway.limits.resp): it must say what
    the URL says, as redis-py does for every other call."""
    admin = fresh_redis_server.client()
    # Without PING: the connection's PING (gateway.limits.resp) needs an answer, not a pong.
    admin.execute_command("ACL", "SETUSER", "gw", "on", ">s3cret", "~*", "+@all", "-ping")
    admin.config_set("requirepass", "admin-secret")  # no more unauthenticated commands
    port = fresh_redis_server.port
    good = Backend("redis", f"redis://gw:s3cret@127.0.0.1:{port}/5?client_name=gw-limiter")
    bad = Backend("redis", f"redis://gw:wrong@127.0.0.1:{port}/5")
    limiter, refused = good.limiter(), bad.limiter()
    try:
        assert (await limiter.hit(subject, rate_rule(5, 10), None)).allowed
        assert "name=gw-limiter" in str(admin.execute_command("CLIENT", "LIST"))
        with redis.Redis(port=port, db=5, password="admin-secret", socket_timeout=5) as db5:
            assert db5.exists(rate_key(subject)) == 1
        assert admin.exists(rate_key(subject)) == 0  # nothing in db 0
        with pytest.raises(StorageError, match="WRONGPASS"):
            await refused.hit(subject, rate_rule(5, 10), None)
        assert (good.errors, bad.errors) == ([], ["hit"])
    finally:
        admin.close()
        await limiter.close()
        await refused.close()


@pytest.fixture
def tls_redis_url(tmp_path: Path) -> Iterator[str]:
    """A rediss:// URL: a fresh redis-server with a self-signed certificate on a TLS port."""
    reason = tls_unavailable()
    if reason is not None:
        pytest.skip(reason)
    server = TlsRedisServer(tmp_path / "redis")
    server.start()
    yield f"{server.tls_url}?ssl_cert_reqs=none"
    server.stop()


async def test_tls_url(tls_redis_url: str, subject: str) -> None:
    backend = Backend("redis", tls_redis_url)
    limiter = backend.limiter()
    try:
        assert (await limiter.hit(subject, rate_rule(5, 10), None)).allowed
        second = await limiter.hit(subject, rate_rule(5, 10), None)
        assert second.rate is not None and second.rate.remaining == 3
        await limiter.ping()
        assert backend.errors == []
    finally:
        await limiter.close()


async def test_close_fails_the_hits_in_flight(
    fresh_redis_server: RedisServer, new_subject: Callable[[], str]
) -> None:
    backend = Backend("redis", fresh_redis_server.url)
    limiter = backend.limiter()
    rate = rate_rule(5, 10)
    assert (await limiter.hit(new_subject(), rate, None)).allowed
    fresh_redis_server.pause()  # so that the next hits are still waiting when closed
    try:
        pending = [asyncio.ensure_future(limiter.hit(new_subject(), rate, None)) for _ in range(5)]
        await asyncio.sleep(0.05)
        await limiter.close()
        for outcome in await asyncio.gather(*pending, return_exceptions=True):
            assert isinstance(outcome, StorageError)
            assert "closed" in str(outcome)
    finally:
        fresh_redis_server.resume()


@pytest.mark.parametrize("kind", ["redis", "sentinel"])
async def test_a_check_answered_in_the_turn_its_caller_left_is_settled_and_let_go(
    request: pytest.FixtureRequest, subject: str, kind: str
) -> None:
    """A client leaves in the very turn of the loop that reads its check's reply: its task is
    cancelled first (the client's connection_lost), then the reply is read, for a call whose
    caller had not yet said where its reply goes. The caller then asked for a reply that had
    gone by: the pipeline held that request's settling for good, and through it the request
    and the config snapshot it was served with (a soak with clients leaving and a reload every
    10 s: a snapshot and ~120 requests a reload per worker, for good), and the admission was
    never settled (not counted, not refunded under refund_on: [499])."""
    limiter = redis_backend_of(request, kind).limiter()
    quota = quota_rule(1000)
    try:
        assert (await limiter.hit(subject, None, quota)).allowed  # the connection is open

        class Leaving:
            """Stands for the request whose client left (Exchange.decided_after_leaving)."""

            def __init__(self) -> None:
                self.told: list[Decision] = []

            def settle(self, decision: Decision) -> None:
                self.told.append(decision)

        for _ in range(5):
            leaving = Leaving()
            gone = weakref.ref(leaving)
            told = leaving.told
            task = asyncio.ensure_future(
                limiter.hit(subject, None, quota, 1, "plan", leaving.settle)
            )
            del leaving
            for _ in range(3):
                await asyncio.sleep(0)  # the check is made and written to Redis
            # Redis answers meanwhile; the loop, held here on purpose, has not read it yet.
            time.sleep(0.05)  # noqa: ASYNC251
            task.cancel()  # before the loop reads the reply, in the same turn
            with pytest.raises(asyncio.CancelledError):
                await task
            del task
            await asyncio.sleep(0.05)
            assert [decision.outcome for decision in told] == ["allowed"]
            assert gone() is None, [type(r).__name__ for r in gc.get_referrers(gone())]
        assert (await limiter.usage(subject, quota)).used == 6
    finally:
        await limiter.close()
