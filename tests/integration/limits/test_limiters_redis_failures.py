"""The limiter when Redis fails: a dead or frozen redis-server or Cluster node fails hits
fast within the storage timeout and recovers, and a hit Redis runs after its deadline takes
nothing; a slot moved under load runs each check once; a node that forgot the script runs it
while another is down.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis
import redis.cluster
import redis.crc

from gateway.config.model import QuotaRule, StorageConfig
from gateway.limits import Decision, Limiter, StorageError, create_limiter
from gateway.limits.base import day_of
from gateway.limits.redis_layout import day_key, rate_key
from tests.support.limiter_backends import Backend, quota_rule, rate_rule
from tests.support.redis_servers import RedisClusterNodes, RedisServer

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


async def first_hit_once_awake(limiter: Limiter, subject: str, quota: QuotaRule) -> Decision:
    """The first hit that Redis answers after it woke: those before fail at once while the
    attempt to connect under way waits for its PING's answer (a few milliseconds)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return await limiter.hit(subject, None, quota)
        except StorageError as failed:
            assert "did not answer" in str(failed), failed
            assert time.monotonic() < deadline, "no hit answered after Redis woke"
            await asyncio.sleep(0.01)


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


async def test_hits_fail_at_once_while_redis_stays_silent_and_not_after(
    fresh_redis_server: RedisServer, subject: str
) -> None:
    """A Redis that answers nothing (frozen here; a network partition looks the same) costs
    the hits that meet it the whole timeout, until an attempt to connect again has gone
    unanswered too; from then on hits fail at once (each would wait the timeout for nothing),
    and the first hit after Redis answers again is admitted. Nothing refused is charged when
    Redis wakes: a frozen Redis's kernel still accepts connections, so hits wait for a PING's
    answer before they are written into a new one; a hit written before the freeze was
    noticed runs after its deadline on Redis's clock and takes nothing; and the hits failed at
    once were never written."""
    backend = Backend("redis", fresh_redis_server.url)
    limiter = backend.limiter(timeout=STORAGE_TIMEOUT)
    quota = quota_rule(100)
    try:
        assert (await limiter.hit(subject, None, quota)).allowed
        fresh_redis_server.pause()
        # The first misses its deadline on the open connection; the second waits for a new
        # connection's PING, which nobody answers either.
        for _ in range(2):
            with pytest.raises(StorageError, match="timed out"):
                await limiter.hit(subject, None, quota)
        for _ in range(10):
            started = time.monotonic()
            with pytest.raises(StorageError, match="did not answer"):
                await limiter.hit(subject, None, quota)
            # Far below the timeout: only a hit that waited for Redis could take that long.
            assert time.monotonic() - started < STORAGE_TIMEOUT / 2
        fresh_redis_server.resume()
        assert (await first_hit_once_awake(limiter, subject, quota)).allowed
        await asyncio.sleep(0.2)  # for any hit still buffered in Redis's sockets to run
        # The first and the last: the one written before the freeze ran too late to take.
        assert (await limiter.usage(subject, quota)).used == 2
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
