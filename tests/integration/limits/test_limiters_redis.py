"""The limiter on Redis only (a redis-server, a Redis Cluster, a Sentinel group): the keys
it leaves expire on their own, a lost script cache, its connections (hits of one tick
pipelined on one, closed with hits in flight, a check answered as its caller left), and its
storage URLs (credentials, database, client name, TLS).
"""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.cluster
import redis.crc

from gateway.config.model import StorageConfig
from gateway.limits import Decision, StorageError, create_limiter
from gateway.limits.periods import quota_period
from gateway.limits.redis_layout import quota_key, rate_key
from tests.support.limiter_backends import UTC, Backend, quota_rule, rate_rule, redis_backend_of
from tests.support.redis_servers import RedisServer, TlsRedisServer, tls_unavailable


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
        quota_ttl = inspector.pttl(quota_key(subject, start, quota)) / 1000
        assert quota_ttl == pytest.approx(end + 60 - time.time(), abs=2)
        # Set when the period's counter is created; later hits leave it (one command fewer).
        await limiter.hit(subject, rate, quota)
        assert inspector.hget(quota_key(subject, start, quota), "used") in (b"2", "2")
        quota_ttl = inspector.pttl(quota_key(subject, start, quota)) / 1000
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
