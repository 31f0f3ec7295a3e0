"""The key store's announcements and reads: the documented channel (one per Redis database), a
change during a full read, a write answered as failed, a Sentinel failover."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import redis

from gateway.config.model import StorageConfig
from gateway.keys import KeyRecord, KeyStore, create_key_store
from gateway.keys.redis import (
    CHANNEL,
    EPOCH_KEY,
    RECORDS_KEY,
    RedisKeyBackend,
)
from gateway.keys.store import CHECK_INTERVAL
from gateway.limits.base import StorageError
from gateway.limits.redis_clients import open_storage_redis
from tests.support.key_store import HONOURED_WITHIN, record, started_store, unique, until
from tests.support.redis_servers import RedisSentinelGroup, RedisServer


async def test_changes_are_announced_on_the_documented_channel(redis_server: RedisServer) -> None:
    listener = redis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=5)
    pubsub = listener.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(CHANNEL)
        async with started_store(redis_server.url) as store:
            name = unique("announced")
            created = await store.create(record(name))
            message = None
            deadline = time.monotonic() + 2
            while message is None and time.monotonic() < deadline:
                message = pubsub.get_message(timeout=0.1)
                if message is not None and message["data"].startswith(b"0\n\n"):
                    # The store's epoch, announced before its first change (version 1).
                    assert store.known_version == 1
                    message = None
        assert message is not None
        version, announced_name, text = message["data"].decode().split("\n", 2)
        assert int(version) == store.known_version
        assert announced_name == name and KeyRecord.from_json(text) == created
    finally:
        pubsub.close()
        listener.close()


class _GatedLoad(RedisKeyBackend):
    """The real backend, whose full reads wait at a gate before their first batch: what a
    read of 100,000 keys (seconds) looks like to a change that arrives meanwhile."""

    def __init__(self, url: str) -> None:
        storage = open_storage_redis(url, 1.0)
        super().__init__(storage, 1.0)
        self.reading = asyncio.Event()
        self.gate = asyncio.Event()

    async def load(self) -> AsyncIterator[list[tuple[str, str]]]:
        self.reading.set()
        await self.gate.wait()
        async for batch in super().load():
            yield batch


async def test_a_change_during_a_full_read_is_honoured_at_once(
    fresh_redis_server: RedisServer,
) -> None:
    """Changes announced during a full read waited for its end (8-13 s at 100,000 keys, with
    a machine busy) before any was honoured; each is now honoured on the table being served
    at once, and again on the table the read makes."""
    url = fresh_redis_server.url
    backend = _GatedLoad(url)
    backend.gate.set()  # the first read goes through
    follower = KeyStore(backend)
    await follower.start()
    try:
        async with started_store(url) as writer:
            made = await writer.create(record("busy"))
            await until(lambda: "busy" in follower.table.records, HONOURED_WITHIN, "created")
            backend.gate.clear()
            backend.reading.clear()
            with contextlib.closing(fresh_redis_server.client()) as admin:
                admin.set(EPOCH_KEY, "another")  # the next version check reads every key
            await asyncio.wait_for(backend.reading.wait(), 5)
            await writer.update("busy", lambda current: replace(current, disabled=True))
            await until(
                lambda: follower.table.records["busy"].disabled,
                HONOURED_WITHIN,
                "the change, while the read waits",
            )
            backend.gate.set()
            await until(lambda: follower.table.loaded and backend.reading.is_set(), 5, "read")
            await asyncio.sleep(0.1)  # the read's end, and the changes after it
            assert follower.table.records["busy"].disabled
            assert follower.table.secret(made.key_sha256) is not None
    finally:
        backend.gate.set()
        await follower.close()


async def test_a_write_answered_as_failed_is_not_made_later(
    fresh_redis_server: RedisServer,
) -> None:
    """A stalled Redis ran a write when it woke, after the admin call was answered 503: a
    created key whose secret nobody was given, its name taken. Writes carry a deadline on
    Redis's clock, as limit checks do."""
    url = fresh_redis_server.url
    store = create_key_store(StorageConfig(url=url, timeout=0.25))
    await store.start()
    try:
        await store.create(record("first"))  # Redis's clock is learnt
        fresh_redis_server.pause()
        try:
            with pytest.raises(StorageError):
                await store.create(record("ghost"))
            await asyncio.sleep(0.2)  # past the write's deadline on Redis's clock
        finally:
            fresh_redis_server.resume()
        await asyncio.sleep(0.2)  # for the write buffered in Redis's socket to run
        with contextlib.closing(fresh_redis_server.client()) as admin:
            assert admin.hget(RECORDS_KEY, "first") is not None
            assert admin.hget(RECORDS_KEY, "ghost") is None
    finally:
        await store.close()


async def test_an_admin_write_waits_out_a_busy_moment_longer_than_the_storage_timeout(
    fresh_redis_server: RedisServer,
) -> None:
    """`storage.timeout` bounds the proxy's hot path; an admin write held up by a busy moment
    longer than that (an audit: 32-57 of 100,000 keys made at 32 at once) was answered 503
    and had to be sent again. It waits up to ADMIN_WAIT, its deadline on Redis's clock with
    it, so a stall of four storage timeouts delays it without failing it."""
    store = create_key_store(StorageConfig(url=fresh_redis_server.url, timeout=0.1))
    await store.start()
    try:
        await store.create(record("first"))  # Redis's clock is learnt
        fresh_redis_server.pause()
        try:
            creating = asyncio.ensure_future(store.create(record("delayed")))
            await asyncio.sleep(0.4)  # the busy moment
        finally:
            fresh_redis_server.resume()
        await creating
        with contextlib.closing(fresh_redis_server.client()) as admin:
            assert admin.hget(RECORDS_KEY, "delayed") is not None
    finally:
        await store.close()


async def test_a_store_in_another_database_of_the_same_redis_is_none_of_its_business(
    fresh_redis_server: RedisServer,
) -> None:
    """Pub/sub channels belong to the server, not to a database: two gateways on databases 1
    and 2 of one Redis (staging and production, say) heard each other's announcements on one
    channel. A process took the other store's changes whose versions came next for its own:
    the other's keys were served (a staging secret let in on production), and its own change
    of that version was then dropped as one it had, for good (201 on create, 401 ever after)."""
    ours, theirs = f"{fresh_redis_server.url}/1", f"{fresh_redis_server.url}/2"
    async with started_store(ours) as seed:
        await seed.create(record("ours-1"))  # our store at version 1, its epoch set
    async with (
        started_store(ours) as store,
        started_store(theirs) as other,
        started_store(theirs) as other_follower,
    ):
        assert store.known_version == 1
        await other.create(record("theirs-1"))  # their version 1: not after ours
        await other.create(record("theirs-2"))  # their version 2: the one ours expects next
        seen_theirs = False
        started = time.monotonic()
        while time.monotonic() - started < 0.2:
            seen_theirs = seen_theirs or "theirs-2" in store.table.records
            await asyncio.sleep(0.005)
        await other.create(record("theirs-3"))
        await until(lambda: "theirs-3" in other_follower.table.records, 1.0, "announced")
        await asyncio.sleep(0.02)  # delivered to every subscriber of the channel by now
        await store.create(record("ours-2"))
        await store.create(record("ours-3"))

        assert not seen_theirs, "a key of the other database was served"
        await until(lambda: "ours-3" in store.table.records, 2 * CHECK_INTERVAL, "ours-3")
        assert sorted(store.table.records) == ["ours-1", "ours-2", "ours-3"]
        assert sorted(other_follower.table.records) == ["theirs-1", "theirs-2", "theirs-3"]


@pytest.mark.parametrize(
    ("url", "channel"),
    [
        ("redis://127.0.0.1:1", CHANNEL),
        ("redis://127.0.0.1:1/0", CHANNEL),
        ("rediss://127.0.0.1:1/4", f"{CHANNEL}:4"),
        ("redis+sentinel://127.0.0.1:2/mymaster/3", f"{CHANNEL}:3"),
        ("redis+cluster://127.0.0.1:3", CHANNEL),
    ],
)
async def test_each_database_has_a_channel_of_its_own(url: str, channel: str) -> None:
    """Database 0 keeps the channel every earlier version used (a rolling upgrade there goes on
    hearing the older processes); a Sentinel's master is followed in the URL's database."""
    storage = open_storage_redis(url, 0.25)
    backend = RedisKeyBackend(storage, 0.25)
    try:
        assert backend._channel == channel
    finally:
        await backend.close()


async def test_the_subscription_follows_the_master_through_a_sentinel_failover(
    fresh_redis_sentinel: RedisSentinelGroup, caplog: pytest.LogCaptureFixture
) -> None:
    """SENTINEL FAILOVER leaves the old master up, as a replica. A subscription left on it
    heard no announcement until that replica had synced with the new master (seconds), and
    each change made meanwhile waited for the version check, warned of as a lost
    announcement. It moves to the new master as the storage's clients do."""
    caplog.set_level(logging.INFO, logger="gateway.keys")
    group = fresh_redis_sentinel
    async with started_store(group.url) as writer, started_store(group.url) as follower:
        await writer.create(record("before"))
        await until(lambda: "before" in follower.table.records, HONOURED_WITHIN, "before")
        promoted = await asyncio.to_thread(group.failover)

        def subscribed_on_the_new_master() -> bool:
            with redis.Redis(port=promoted.port, socket_timeout=5) as client:
                return dict(client.pubsub_numsub(CHANNEL)).get(CHANNEL.encode(), 0) >= 2

        # The storage's clients ask the Sentinels every 0.5 s; the key store looks at each of
        # its version checks (0.4 s).
        await until(subscribed_on_the_new_master, 5.0, "both subscribed on the new master")
        caplog.clear()
        await writer.create(record("after"))
        waited = await until(
            lambda: "after" in follower.table.records, HONOURED_WITHIN, "after the failover"
        )
    messages = [r.getMessage() for r in caplog.records]
    assert not any("announcement was lost" in m for m in messages), messages
    assert waited < CHECK_INTERVAL, waited  # announced, not found by a version check
