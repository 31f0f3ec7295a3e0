"""Redis behind Sentinel: the limit storage follows its master through a failover.

Each test has a group of its own (a master, a replica, two Sentinels) and fails it over, either
with SENTINEL FAILOVER or by killing the master and letting the Sentinels notice. Meanwhile the
storage may be unavailable (StorageError, so 503 storage_unavailable with `on_error: deny`);
after the promotion requests are admitted again, with no restart of anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import redis

from gateway.config import RateRule, StorageConfig
from gateway.limits import Limiter, StorageError, create_limiter
from gateway.limits.redis import rate_key
from gateway.limits.redis_clients import open_storage_redis
from tests.support.config import server_yaml
from tests.support.operations import ThreadedUpstream, call, serving_workers, wait_for
from tests.support.processes import GatewayProcess
from tests.support.redis_servers import RedisSentinelGroup
from tests.support.sockets import free_ports

RATE = RateRule(limit=100_000, window=60.0, per="minute")
# From the promotion until a hit is admitted again: a reconnection asks the Sentinels (who
# know at once), so this is slack for a busy machine, not an expected wait.
READMITTED_WITHIN = 10.0
# After SENTINEL FAILOVER, until hits reach the new master: the limiter asks the Sentinels
# every 0.5 s; without that it would wait for the Sentinels to demote the old master (~10 s).
LEFT_THE_OLD_MASTER_WITHIN = 5.0
# Killing the master: the Sentinels wait `down_after_ms` (1 s), elect a leader, promote.
PROMOTED_WITHIN = 30.0


def subject() -> str:
    return f"sentinel-{uuid.uuid4().hex[:12]}:product"


async def admitted_again(limiter: Limiter, name: str, within: float) -> Counter[str]:
    """Hit every 20 ms until one is admitted; what the hits before it answered."""
    seen: Counter[str] = Counter()
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            decision = await limiter.hit(name, RATE, None)
        except StorageError:
            seen["storage error"] += 1
        else:
            if decision.allowed:
                return seen
            seen[decision.outcome] += 1
        await asyncio.sleep(0.02)
    raise AssertionError(f"no hit admitted within {within}s: {dict(seen)}")


def counted_on_master(group: RedisSentinelGroup, name: str) -> int:
    with redis.Redis(port=group.master_port(), socket_timeout=5) as master:
        return int(master.zcard(rate_key(name)))


async def test_limiter_follows_sentinel_failover(fresh_redis_sentinel: RedisSentinelGroup) -> None:
    group = fresh_redis_sentinel
    name = subject()
    limiter = create_limiter(StorageConfig(url=group.url, timeout=0.25))

    async def lands_on_the_master() -> bool:
        """A hit, admitted and counted by the server the Sentinels call the master."""
        before = counted_on_master(group, name)
        try:
            admitted = (await limiter.hit(name, RATE, None)).allowed
        except StorageError:
            return False
        return admitted and counted_on_master(group, name) == before + 1

    try:
        assert await lands_on_the_master()
        await limiter.ping()
        old_port = group.master_port()
        promoted = await asyncio.to_thread(group.failover)
        assert promoted.port != old_port
        # The old master is alive and still takes writes until the Sentinels demote it: the
        # limiter must leave it by itself, not wait for its connection to be killed.
        deadline = time.monotonic() + LEFT_THE_OLD_MASTER_WITHIN
        while not await lands_on_the_master():
            assert time.monotonic() < deadline, "hits never reached the new master"
            await asyncio.sleep(0.02)
        for _ in range(5):
            assert await lands_on_the_master()
        await limiter.ping()
    finally:
        await limiter.close()


async def test_storage_client_leaves_the_old_master_after_a_forced_failover(
    fresh_redis_sentinel: RedisSentinelGroup,
) -> None:
    """The redis-py client (usage, credit, the key store) follows a failover ordered while the
    old master lives, without waiting for the Sentinels to demote it."""
    group = fresh_redis_sentinel
    storage = open_storage_redis(group.url, 0.25)
    name = f"probe-{uuid.uuid4().hex[:8]}"

    def on_master() -> int:
        with redis.Redis(port=group.master_port(), socket_timeout=5) as master:
            return int(master.get(name) or 0)

    try:
        await storage.client.incr(name)  # an idle pooled connection to the master, from now
        assert on_master() == 1
        old_port = group.master_port()
        promoted = await asyncio.to_thread(group.failover)
        assert promoted.port != old_port
        deadline = time.monotonic() + LEFT_THE_OLD_MASTER_WITHIN
        while True:
            before = on_master()
            with contextlib.suppress(Exception):
                await storage.client.incr(name)
            if on_master() == before + 1:
                break
            assert time.monotonic() < deadline, "writes never reached the new master"
            await asyncio.sleep(0.05)
    finally:
        await storage.aclose()


async def test_a_connection_in_use_when_the_master_moves_is_not_kept(
    fresh_redis_sentinel: RedisSentinelGroup,
) -> None:
    """A connection that a call holds while the storage client learns of a failover is dropped
    when the call gives it back: kept, it would go on writing to the old master."""
    group = fresh_redis_sentinel
    storage = open_storage_redis(group.url, 0.25)
    pool = storage.client.connection_pool
    name = f"probe-{uuid.uuid4().hex[:8]}"
    try:
        await storage.client.incr(name)
        await storage.client.execute_command("WAIT", 1, 5000)  # the replica has it too
        held = await pool.get_connection()  # as a call on its way holds it
        promoted = await asyncio.to_thread(group.failover)
        deadline = time.monotonic() + LEFT_THE_OLD_MASTER_WITHIN
        while pool.master_address is None or int(pool.master_address[1]) != promoted.port:
            assert time.monotonic() < deadline, "the client never heard of the new master"
            await asyncio.sleep(0.02)
        await pool.release(held)
        assert await storage.client.incr(name) == 2  # the replica had the first one
        with redis.Redis(port=promoted.port, socket_timeout=5) as master:
            assert int(master.get(name) or 0) == 2
    finally:
        await storage.aclose()


async def test_limiter_follows_the_promotion_after_the_master_dies(
    fresh_redis_sentinel: RedisSentinelGroup,
) -> None:
    group = fresh_redis_sentinel
    name = subject()
    limiter = create_limiter(StorageConfig(url=group.url, timeout=0.25))
    try:
        assert (await limiter.hit(name, RATE, None)).allowed
        killed = group.stop_master()
        # While no master is known, hits fail as StorageError (never anything else).
        with contextlib.suppress(StorageError):
            await limiter.hit(name, RATE, None)
        await asyncio.to_thread(group.wait_for_promotion, killed.port, PROMOTED_WITHIN)
        seen = await admitted_again(limiter, name, READMITTED_WITHIN)
        assert set(seen) <= {"storage error"}, seen
        await limiter.ping()
    finally:
        await limiter.close()


API = """
products:
  shop:
    upstream: {{url: "{upstream}"}}
    routes:
      - path: /shop/{{rest:path}}
plans:
  roomy:
    rate: {{limit: 100000, per: minute}}
keys:
  - {{name: buyer, key: buyer-secret, plans: {{shop: roomy}}}}
"""


def test_gateway_workers_keep_answering_through_a_failover(
    fresh_redis_sentinel: RedisSentinelGroup, tmp_path: Path
) -> None:
    group = fresh_redis_sentinel
    proxy_port, admin_port = free_ports(2)
    config = tmp_path / "config"
    config.mkdir()
    (config / "00-server.yaml").write_text(
        server_yaml(proxy_port, admin_port, group.url, workers=2)
    )
    with ThreadedUpstream() as upstream:
        (config / "10-api.yaml").write_text(API.format(upstream=upstream.url))
        gateway = GatewayProcess(config)
        try:
            gateway.start(proxy_port, admin_port)
            serving_workers(gateway, 2)

            def status() -> tuple[int, str | None]:
                # A new connection each time: the kernel spreads them over both workers.
                answer = call(proxy_port, "/shop/item", headers={"X-API-Key": "buyer-secret"})
                code = json.loads(answer.body).get("code") if answer.status != 200 else None
                return answer.status, code

            assert status() == (200, None)
            answers: list[tuple[int, str | None]] = []
            stop = threading.Event()

            def keep_asking() -> None:
                while not stop.is_set():
                    answers.append(status())
                    time.sleep(0.02)

            asker = threading.Thread(target=keep_asking)
            asker.start()
            try:
                group.failover()

                def twenty_in_a_row() -> bool:
                    return all(status() == (200, None) for _ in range(20))

                wait_for(twenty_in_a_row, READMITTED_WITHIN, "every worker admits again")
            finally:
                stop.set()
                asker.join()
            # Through the switch: answered every time, at worst with 503 storage_unavailable.
            assert set(answers) <= {(200, None), (503, "storage_unavailable")}, Counter(answers)
            assert answers, "the requests during the failover"
        finally:
            gateway.stop()
            gateway.close()


# Rounds of open-then-close; each close lands inside a Sentinel query with a good chance (they
# run back to back here), and before the fix about one in five of those hung.
CLOSE_ROUNDS = 40
CLOSED_WITHIN = 3.0


async def test_closing_ends_within_a_bound_though_a_sentinel_query_loses_the_cancellation(
    redis_sentinel: RedisSentinelGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The master is asked of the Sentinels in the background (the clients' follower and the
    limiter's recheck). On Python 3.11 redis-py writes a Sentinel command through
    `asyncio.wait_for`, which returns the write's result when the task is cancelled after the
    write finished but before the task resumed: the cancellation is lost. The loops asking the
    Sentinels then went on for good, and a worker's close waited for them for good (a drain
    hung, the gateway killed with -9). The asking runs back to back here, so that the closes,
    made at every few loop turns, land inside a query."""
    from gateway.keys.redis import RedisKeyBackend
    from gateway.keys.store import KeyStore
    from gateway.limits import redis as redis_limits
    from gateway.limits import redis_clients

    monkeypatch.setattr(redis_clients, "MASTER_RECHECK_SECONDS", 0.0)
    monkeypatch.setattr(redis_limits, "MASTER_RECHECK_SECONDS", 0.0)
    for round_ in range(CLOSE_ROUNDS):
        storage = open_storage_redis(redis_sentinel.url, 0.25)
        limiter = redis_limits.RedisLimiter(storage, 0.25)
        keys = KeyStore(RedisKeyBackend(storage, 0.25))
        await keys.start()
        assert (await limiter.hit(subject(), RATE, None)).allowed  # connects: the recheck runs
        for _ in range(round_ % 13):
            await asyncio.sleep(0)
        began = time.monotonic()
        async with asyncio.timeout(CLOSED_WITHIN):
            await keys.close()
            await limiter.close()
        assert time.monotonic() - began < CLOSED_WITHIN
