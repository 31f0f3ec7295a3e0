"""The cluster client (gateway/limits/redis_cluster.py) with one master of three down, and the
limiter's calls to a master that answers nothing (gateway/limits/cluster_calls.py): its hits
and refunds, and the writes of a day's sets before a hit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.cluster import key_slot

from gateway.config.model import StorageConfig
from gateway.limits import Limiter, create_limiter
from gateway.limits.base import Receipt, StorageError, day_of
from gateway.limits.redis import RedisLimiter
from gateway.limits.redis_clients import StorageGuard, open_storage_redis
from gateway.limits.redis_cluster import RELEARN_SECONDS
from gateway.limits.redis_layout import rate_key
from gateway.limits.redis_registry import day_set
from tests.support.limiter_backends import Backend, quota_rule
from tests.support.redis_servers import RedisClusterNodes
from tests.support.sockets import free_port

TIMEOUT = 0.5
DOWN = 2  # the index of the master the tests stop


@pytest.fixture
def partial_cluster(tmp_path: Path) -> Iterator[RedisClusterNodes]:
    """A cluster of its own whose healthy masters go on serving while one is down."""
    cluster = RedisClusterNodes(tmp_path, 3, "--cluster-require-full-coverage", "no")
    cluster.start()
    yield cluster
    cluster.stop()


def key_on(cluster: RedisClusterNodes, node: int, prefix: str) -> str:
    """A key whose slot `node` serves."""
    return next(
        key
        for key in (f"{prefix}{i}" for i in range(10_000))
        if cluster.owner_of(key_slot(key.encode())) == node
    )


def subject_on(cluster: RedisClusterNodes, node: int, prefix: str) -> str:
    """A subject whose keys (all sharing its hash tag) `node` serves."""
    return next(
        subject
        for subject in (f"{prefix}-{i}.test:product" for i in range(10_000))
        if cluster.owner_of(key_slot(rate_key(subject).encode())) == node
    )


def slot_map_reads(cluster: RedisClusterNodes) -> int:
    """CLUSTER SLOTS (and other CLUSTER) commands the healthy masters served."""
    total = 0
    for node in cluster.nodes[:DOWN]:
        client = node.client()
        try:
            stats = client.info("commandstats")
        finally:
            client.close()
        total += sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_cluster"))
    return total


def reset_stats(cluster: RedisClusterNodes) -> None:
    for node in cluster.nodes[:DOWN]:
        client = node.client()
        try:
            client.config_resetstat()
        finally:
            client.close()


async def test_calls_to_a_down_master_fail_alone_and_relearn_the_map_at_a_bounded_rate(
    partial_cluster: RedisClusterNodes,
) -> None:
    """redis-py relearned the whole cluster after each call that failed to connect, and every
    call waited for that: 4,000 calls a second to a healthy master fell to 125 while others
    kept calling the one that was down. Here each failure costs its own call only."""
    storage = open_storage_redis(partial_cluster.url, TIMEOUT)
    guard = StorageGuard(storage.client, TIMEOUT, "limit storage")
    healthy = key_on(partial_cluster, 0, "healthy")
    down = key_on(partial_cluster, DOWN, "down")
    try:
        assert await guard("set", lambda: storage.client.set(down, "1")) is True
        partial_cluster.nodes[DOWN].stop()
        reset_stats(partial_cluster)
        started = time.monotonic()
        for _ in range(100):
            with pytest.raises(StorageError):
                await guard("incr", lambda: storage.client.incr(down))
            await guard("incr", lambda: storage.client.incr(healthy))  # never a failure
        elapsed = time.monotonic() - started
        await asyncio.sleep(RELEARN_SECONDS)  # the relearning the last failures asked for
        relearnt = slot_map_reads(partial_cluster)
        assert 1 <= relearnt <= 2 + elapsed / RELEARN_SECONDS, (relearnt, elapsed)
    finally:
        await storage.aclose()


async def test_a_master_back_from_the_dead_is_served_again(
    partial_cluster: RedisClusterNodes,
) -> None:
    storage = open_storage_redis(partial_cluster.url, TIMEOUT)
    guard = StorageGuard(storage.client, TIMEOUT, "limit storage")
    down = key_on(partial_cluster, DOWN, "down")
    try:
        assert await guard("incr", lambda: storage.client.incr(down)) == 1
        partial_cluster.nodes[DOWN].stop()
        with pytest.raises(StorageError):
            await guard("incr", lambda: storage.client.incr(down))
        partial_cluster.nodes[DOWN].start()  # on the same port; its keys were lost
        deadline = time.monotonic() + 10
        while True:
            try:
                assert await guard("incr", lambda: storage.client.incr(down)) == 1
                break
            except StorageError:
                assert time.monotonic() < deadline, "the master's slots were not served again"
                await asyncio.sleep(0.05)
    finally:
        await storage.aclose()


async def test_a_url_naming_several_nodes_learns_the_cluster_from_one_that_answers(
    redis_cluster: RedisClusterNodes,
) -> None:
    """With one node named, a gateway could not start while that node was down."""
    url = f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{redis_cluster.port}"
    storage = open_storage_redis(url, TIMEOUT)
    guard = StorageGuard(storage.client, TIMEOUT, "limit storage")
    key = key_on(redis_cluster, DOWN, "seeded")
    try:
        assert await guard("set", lambda: storage.client.set(key, "1")) is True
        assert await guard("get", lambda: storage.client.get(key)) == b"1"
    finally:
        await storage.aclose()


async def test_readiness_fails_while_the_cluster_refuses_commands(tmp_path: Path) -> None:
    """A cluster that lost a master (and requires full coverage, Redis's default) answers PING
    on every node and CLUSTERDOWN to every command with a key: the probe must see the latter."""
    cluster = RedisClusterNodes(tmp_path)
    cluster.start()
    limiter = create_limiter(StorageConfig(url=cluster.url, timeout=TIMEOUT))
    try:
        await limiter.ping()
        cluster.nodes[DOWN].stop()
        deadline = time.monotonic() + 15  # the node timeout (2 s) and the gossip after it
        while True:
            try:
                await limiter.ping()
            except StorageError as error:
                assert "cluster_state" in str(error) or "state is" in str(error), error
                break
            assert time.monotonic() < deadline, "the probe never saw the cluster down"
            await asyncio.sleep(0.1)
    finally:
        await limiter.close()
        cluster.stop()


HIT_TIMEOUT = 0.25  # the default storage.timeout
QUOTA = quota_rule(100)


async def admitted(limiter: Limiter, subject: str) -> Receipt:
    """An admission on a master that answers: on a busy two-core machine one may miss its
    deadline, and is tried again (one that ran late took nothing)."""
    for attempt in range(5):
        try:
            decision = await limiter.hit(subject, None, QUOTA, settles=True)
        except StorageError:
            if attempt == 4:
                raise
            await asyncio.sleep(0.05)
            continue
        assert decision.allowed and decision.receipt is not None
        return decision.receipt
    raise AssertionError("unreachable")


async def test_calls_to_a_silent_master_fail_at_once_and_resume_when_it_answers(
    partial_cluster: RedisClusterNodes,
) -> None:
    """A master that answers nothing (frozen here; a silent partition looks the same) cost
    every hit for its slots the whole timeout. Once a hit to it and a PING after it have gone
    unanswered, its hits and refunds fail at once while the other masters' are admitted, and
    once it answers again its hits are admitted again. Nothing refused is charged: the hits
    that timed out ran after their deadlines, and those failed at once were never sent."""
    backend = Backend("cluster", partial_cluster.url)
    limiter = backend.limiter(timeout=HIT_TIMEOUT)
    silent = subject_on(partial_cluster, DOWN, "silent")
    healthy = [subject_on(partial_cluster, node, f"healthy{node}") for node in range(DOWN)]
    admissions = dict.fromkeys(healthy, 0)
    frozen = partial_cluster.nodes[DOWN]
    try:
        receipt = await admitted(limiter, silent)  # the slot map and the node's clock known
        frozen.pause()
        try:
            with pytest.raises(StorageError, match="timed out"):
                await limiter.hit(silent, None, QUOTA)
            # The next may time out too, while the PING that the first started is on its way;
            # from the PING's own timeout on, none waits (a loose bound for a busy machine).
            waiting_ends = time.monotonic() + 8 * HIT_TIMEOUT
            fast = 0
            while fast < 10:
                for subject in healthy:  # the other masters serve throughout
                    await admitted(limiter, subject)
                    admissions[subject] += 1
                started = time.monotonic()
                with pytest.raises(StorageError) as failed:
                    await limiter.hit(silent, None, QUOTA)
                if "did not answer" not in str(failed.value):
                    assert "timed out" in str(failed.value), failed.value
                    assert time.monotonic() < waiting_ends, "hits still wait for the silent node"
                    continue
                assert time.monotonic() - started < HIT_TIMEOUT / 2
                fast += 1
            started = time.monotonic()
            with pytest.raises(StorageError, match="did not answer"):
                await limiter.refund(silent, receipt)
            assert time.monotonic() - started < HIT_TIMEOUT / 2
            assert backend.errors.count("refund") == 1  # counted, as every failed call is
        finally:
            frozen.resume()
        resumed = time.monotonic()
        while True:
            try:
                await limiter.hit(silent, None, QUOTA)
                break
            except StorageError:
                # Refused until the PING under way (or one a refusal starts) is answered.
                assert time.monotonic() - resumed < 4 * HIT_TIMEOUT, "the node is not used again"
                await asyncio.sleep(0.005)
        await asyncio.sleep(0.2)  # for any hit still buffered in the node's sockets to run
        # The first and the last: those that timed out ran too late to take anything.
        assert (await limiter.usage(silent, QUOTA)).used == 2
        for subject, count in admissions.items():
            assert (await limiter.usage(subject, QUOTA)).used == count
    finally:
        frozen.resume()
        await limiter.close()


async def test_a_silent_master_of_the_days_set_delays_first_admissions_until_found_silent(
    partial_cluster: RedisClusterNodes,
) -> None:
    """A subscription's first admission of the day writes the day's set before its hit. When
    the master of that set answers nothing, the admission waits for it half the timeout and
    the hit goes without it, admitted as it was before that write was made, and answered
    within the one timeout; once a PING to that master has gone unanswered too, first
    admissions send it nothing and wait for nothing. When it answers again, the sets are
    written before the hits again."""
    errors: list[str] = []
    now = time.time()  # one day throughout, whatever the test's own clock does at midnight
    limiter = RedisLimiter(
        open_storage_redis(partial_cluster.url, HIT_TIMEOUT),
        HIT_TIMEOUT,
        errors.append,
        lambda: now,
    )
    day = day_of(now)
    holding = partial_cluster.owner_of(key_slot(day_set(day).encode()))
    answering = next(node for node in range(3) if node != holding)
    subjects = (subject_on(partial_cluster, answering, f"first{i}") for i in range(1000))
    frozen = partial_cluster.nodes[holding]
    inspector = Backend("cluster", partial_cluster.url).inspector()
    try:
        await admitted(limiter, next(subjects))  # the slot map and the masters' clocks known
        await limiter._registry.settled()  # ... and what it recorded after its reply
        frozen.pause()
        try:
            started = time.monotonic()
            await admitted(limiter, next(subjects))
            assert HIT_TIMEOUT / 2 <= time.monotonic() - started < HIT_TIMEOUT + 0.25
            # The next may wait too, while the PING the first started is on its way; from the
            # PING's own timeout on, none waits (a loose bound for a busy machine).
            waiting_ends = time.monotonic() + 8 * HIT_TIMEOUT
            fast = 0
            while fast < 10:
                started = time.monotonic()
                await admitted(limiter, next(subjects))
                if time.monotonic() - started < HIT_TIMEOUT / 2:
                    fast += 1
                else:
                    assert time.monotonic() < waiting_ends, "first admissions still wait"
                    fast = 0
            assert "register" in errors  # the writes before the hits failed, counted as such
        finally:
            frozen.resume()
        resumed = time.monotonic()
        while True:
            subject = next(subjects)
            await admitted(limiter, subject)
            if inspector.sismember(day_set(day), subject):
                break  # written before the hit's reply: before the hit
            assert time.monotonic() - resumed < 8 * HIT_TIMEOUT, "the sets wait for the reply"
            await asyncio.sleep(0.005)
    finally:
        frozen.resume()
        inspector.close()
        await limiter.close()


async def test_a_first_admission_on_a_silent_master_is_answered_within_the_one_timeout(
    partial_cluster: RedisClusterNodes,
) -> None:
    """A subscription's first admission of the day writes the day's set before its hit, and
    the two share one storage timeout: a master that holds both and answers nothing costs the
    admission that timeout (then `on_error`), as it did before the set was written first, not
    one timeout each; and nothing is taken when the master wakes."""
    now = time.time()
    day = day_of(now)
    holding = partial_cluster.owner_of(key_slot(day_set(day).encode()))
    limiter = RedisLimiter(
        open_storage_redis(partial_cluster.url, TIMEOUT), TIMEOUT, clock=lambda: now
    )
    frozen = partial_cluster.nodes[holding]
    try:
        # The slot map and the master's clock known (the hit then goes out with its deadline).
        await admitted(limiter, subject_on(partial_cluster, holding, "warm"))
        await limiter._registry.settled()
        subject = subject_on(partial_cluster, holding, "first")
        frozen.pause()
        try:
            started = time.monotonic()
            with pytest.raises(StorageError, match="timed out"):
                await limiter.hit(subject, None, QUOTA)
            assert time.monotonic() - started < TIMEOUT + 0.25
        finally:
            frozen.resume()
        await asyncio.sleep(0.2)  # for the hit buffered in the master's socket to run
        assert (await limiter.usage(subject, QUOTA)).used == 0
    finally:
        frozen.resume()
        await limiter.close()
