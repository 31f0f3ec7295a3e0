"""The key store on real Redis and Redis Cluster: two stores stand for two gateway processes
sharing the storage; what one writes, the other serves from memory within a second."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

import pytest
import redis

from gateway.config.model import StorageConfig
from gateway.keys import KeyRecord, KeyStore, create_key_store
from gateway.keys.backend import WriteRefused
from gateway.keys.records import PreviousSecret
from gateway.keys.redis import (
    CHANNEL,
    EPOCH_KEY,
    LOG_KEY,
    RECORDS_KEY,
    VERSION_KEY,
    RedisKeyBackend,
)
from gateway.keys.store import CHECK_INTERVAL, RECHECK_AHEAD
from gateway.limits.base import StorageError
from gateway.limits.redis_clients import open_storage_redis
from tests.support.redis_servers import RedisClusterNodes, RedisSentinelGroup, RedisServer

HONOURED_WITHIN = 1.0


@pytest.fixture(params=["redis", "cluster", "sentinel"])
def storage_url(request: pytest.FixtureRequest) -> str:
    fixture = {"redis": "redis_server", "cluster": "redis_cluster"}.get(
        request.param, "redis_sentinel"
    )
    server: RedisServer | RedisClusterNodes | RedisSentinelGroup = request.getfixturevalue(fixture)
    return server.url


@asynccontextmanager
async def started_store(url: str) -> AsyncIterator[KeyStore]:
    store = create_key_store(StorageConfig(url=url, timeout=1.0))
    await store.start()
    try:
        yield store
    finally:
        await store.close()


def record(name: str, digest: str | None = None, **fields: object) -> KeyRecord:
    now = time.time()
    digest = digest or uuid.uuid4().hex * 2
    return replace(KeyRecord(name, digest, {"soccer": "trial"}, created=now, updated=now), **fields)


async def until(condition: Callable[[], bool], within: float, what: str) -> float:
    """Seconds until `condition` held; fails naming `what` after `within`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def test_every_change_reaches_the_other_process_within_a_second(storage_url: str) -> None:
    async with started_store(storage_url) as writer, started_store(storage_url) as follower:
        assert follower.table.loaded
        name = unique("acme")
        created = await writer.create(record(name))
        assert writer.table.secret(created.key_sha256) is not None  # its own write: at once
        await until(
            lambda: follower.table.secret(created.key_sha256) is not None,
            HONOURED_WITHIN,
            "created key known to the follower",
        )

        await writer.update(name, lambda current: replace(current, disabled=True))
        await until(
            lambda: follower.table.records[name].disabled, HONOURED_WITHIN, "disable followed"
        )

        until_at = time.time() + 3600
        await writer.update(
            name,
            lambda current: replace(
                current,
                key_sha256="f" * 64,
                previous=(PreviousSecret(current.key_sha256, until_at),),
            ),
        )
        await until(
            lambda: follower.table.secret("f" * 64) is not None, HONOURED_WITHIN, "rotation"
        )
        old = follower.table.secret(created.key_sha256)
        new = follower.table.secret("f" * 64)
        assert old is not None and new is not None
        assert old[0] is new[0] and old[1] == until_at and new[1] is None  # one key, two secrets

        await writer.delete(name)
        await until(lambda: name not in follower.table.records, HONOURED_WITHIN, "delete")
        assert follower.table.secret("f" * 64) is None
        assert follower.table.secret(created.key_sha256) is None
        assert follower.known_version == writer.known_version


async def test_a_restarted_process_loads_every_key(storage_url: str) -> None:
    names = [unique("kept") for _ in range(3)]
    async with started_store(storage_url) as writer:
        for name in names:
            await writer.create(record(name))
        await writer.delete(names[2])
    async with started_store(storage_url) as restarted:
        assert restarted.table.loaded
        assert names[0] in restarted.table.records and names[1] in restarted.table.records
        assert names[2] not in restarted.table.records


async def test_names_and_secrets_are_unique_in_the_storage(storage_url: str) -> None:
    async with started_store(storage_url) as one, started_store(storage_url) as other:
        name = unique("taken")
        first = await one.create(record(name))
        with pytest.raises(WriteRefused) as refused:
            await other.create(record(name))
        assert refused.value.reason == "name_taken"
        with pytest.raises(WriteRefused) as refused:
            await other.create(record(unique("copy"), first.key_sha256))
        assert refused.value.reason == "secret_taken"
        with pytest.raises(WriteRefused) as refused:
            await other.update(unique("ghost"), lambda current: current)
        assert refused.value.reason == "not_found"
        # Once deleted, its secret may be used again.
        await one.delete(name)
        await other.create(record(unique("reuse"), first.key_sha256))


async def test_concurrent_changes_of_one_key_are_both_kept(storage_url: str) -> None:
    async with started_store(storage_url) as one, started_store(storage_url) as other:
        name = unique("busy")
        await one.create(record(name))
        await asyncio.gather(
            one.update(name, lambda current: replace(current, disabled=True)),
            other.update(name, lambda current: replace(current, plans={"weather": "pro"})),
            one.update(name, lambda current: replace(current, expires=4102444800.0)),
        )
        final = await one.read(name)
        assert final is not None
        assert (final.disabled, dict(final.plans), final.expires) == (
            True,
            {"weather": "pro"},
            4102444800.0,
        )


async def test_a_busy_key_is_never_a_storage_failure_and_loses_no_change(
    storage_url: str,
) -> None:
    """Many writers of one key, in three processes: each change is kept or refused as
    "changed" (409), never a storage failure (503, which would send the operator looking at
    Redis), and none is lost."""
    async with (
        started_store(storage_url) as one,
        started_store(storage_url) as two,
        started_store(storage_url) as three,
    ):
        name = unique("busy")
        await one.create(record(name, plans={}))

        def adding(plan: str) -> Callable[[KeyRecord], KeyRecord]:
            return lambda current: replace(current, plans={**current.plans, plan: "trial"})

        stores = (one, two, three) * 5
        outcomes = await asyncio.gather(
            *(store.update(name, adding(f"p{i}")) for i, store in enumerate(stores)),
            return_exceptions=True,
        )
        refused = [o for o in outcomes if isinstance(o, BaseException)]
        assert all(isinstance(o, WriteRefused) and o.reason == "changed" for o in refused)
        final = await one.read(name)
        assert final is not None
        kept = {f"p{i}" for i, o in enumerate(outcomes) if not isinstance(o, BaseException)}
        assert set(final.plans) == kept


async def test_the_writes_of_one_key_in_one_process_take_turns(storage_url: str) -> None:
    """Within one process nothing needs to race: 60 concurrent changes of one key are all
    made (30 admin PATCHes at once got a third of them refused 409 on Redis)."""
    async with started_store(storage_url) as one:
        name = unique("turns")
        await one.create(record(name, plans={}))

        def adding(plan: str) -> Callable[[KeyRecord], KeyRecord]:
            return lambda current: replace(current, plans={**current.plans, plan: "trial"})

        await asyncio.gather(*(one.update(name, adding(f"p{i}")) for i in range(60)))
        final = await one.read(name)
        assert final is not None
        assert set(final.plans) == {f"p{i}" for i in range(60)}
        assert not one._turns  # nothing kept for keys no longer being written


async def test_a_lost_announcement_is_repaired_by_the_version_check(
    fresh_redis_server: RedisServer,
) -> None:
    async with started_store(fresh_redis_server.url) as follower:
        # A change written as write.lua does, but announced to nobody.
        client = fresh_redis_server.client()
        try:
            client.hset(RECORDS_KEY, "unannounced", record("unannounced").to_json())
            client.incr(VERSION_KEY)
        finally:
            client.close()
        waited = await until(
            lambda: "unannounced" in follower.table.records,
            3 * CHECK_INTERVAL + 1.0,
            "the version check read the keys afresh",
        )
        assert waited >= RECHECK_AHEAD  # not by an announcement (milliseconds): by the check
        assert waited < 1.0  # honoured within a second all the same


async def test_a_dropped_subscription_catches_up_on_the_changed_keys_only(
    fresh_redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Changes made while a follower's subscription is gone (a network blip, a proxy cutting
    idle connections) reach it within a second by reading the keys they touched, not every
    key: at 100,000 keys a full read took 7 s, revocations included."""
    url = fresh_redis_server.url
    kept, doomed = record(unique("kept")), record(unique("doomed"))
    async with started_store(url) as writer:
        await writer.create(kept)
        await writer.create(doomed)
    async with started_store(url) as writer, started_store(url) as follower:
        assert doomed.name in follower.table.records
        caplog.clear()
        caplog.set_level("INFO", logger="gateway.keys")
        with contextlib.closing(fresh_redis_server.client()) as admin:
            assert admin.client_kill_filter(_type="pubsub") >= 2
        added = record(unique("added"))
        await writer.delete(doomed.name)
        started = time.monotonic()  # the first change is made: honoured within a second of it
        await writer.create(added)
        await until(
            lambda: (
                doomed.name not in follower.table.records and added.name in follower.table.records
            ),
            HONOURED_WITHIN,
            "the changes made while unsubscribed",
        )
        assert time.monotonic() - started < HONOURED_WITHIN
        assert kept.name in follower.table.records
    messages = [r.getMessage() for r in caplog.records]
    assert any("caught up on" in m for m in messages), messages
    assert not any(" loaded (storage version" in m for m in messages), messages


async def test_a_log_that_does_not_reach_back_means_a_full_read(
    fresh_redis_server: RedisServer,
) -> None:
    url = fresh_redis_server.url
    async with started_store(url) as writer, started_store(url) as follower:
        await writer.create(record("first"))
        await until(lambda: "first" in follower.table.records, HONOURED_WITHIN, "first")
        with contextlib.closing(fresh_redis_server.client()) as admin:
            admin.client_kill_filter(_type="pubsub")
            await writer.create(record("second"))
            admin.delete(LOG_KEY)  # as if trimmed past the follower's version
        await until(lambda: "second" in follower.table.records, HONOURED_WITHIN, "second")
        assert "first" in follower.table.records


async def test_the_first_key_of_an_empty_store_is_followed_as_any_change(
    fresh_redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The write that begins a store sets its epoch, which a process that read it empty took
    for another store's: every process read every key again at the first key made, saying at
    WARNING that the storage was emptied. The epoch is announced with that change."""
    url = fresh_redis_server.url
    async with started_store(url) as writer, started_store(url) as follower:
        caplog.clear()
        caplog.set_level("INFO", logger="gateway.keys")
        for name in ("first", "second"):
            await writer.create(record(name))
        await until(
            lambda: {"first", "second"} <= set(follower.table.records), HONOURED_WITHIN, "both"
        )
        # Two version checks of each process at least (the full read came with the first).
        await asyncio.sleep(2 * CHECK_INTERVAL + RECHECK_AHEAD)
        with contextlib.closing(fresh_redis_server.client()) as admin:
            epoch = admin.get(EPOCH_KEY)
        assert epoch is not None and follower._epoch == writer._epoch == epoch.decode()
    messages = [r.getMessage() for r in caplog.records]
    assert not any(" loaded (storage version" in m for m in messages), messages
    assert not any("emptied" in m for m in messages), messages


async def test_a_store_emptied_and_begun_again_after_its_first_key_is_read_afresh(
    fresh_redis_server: RedisServer,
) -> None:
    """Begun, emptied and begun again before a version check, at the version the follower is
    at: the epoch it took from the first beginning is not the store's, so it reads it all."""
    url = fresh_redis_server.url
    async with started_store(url) as writer, started_store(url) as follower:
        await writer.create(record("old"))
        await until(lambda: "old" in follower.table.records, HONOURED_WITHIN, "old")
        with contextlib.closing(fresh_redis_server.client()) as admin:
            admin.flushall()
        await writer.create(record("new"))  # version 1 again, of another epoch
        await until(
            lambda: set(follower.table.records) == {"new"},
            3 * CHECK_INTERVAL + 1.0,
            "the new store, and nothing of the old",
        )


async def test_a_store_emptied_and_refilled_while_followed_is_read_afresh(
    fresh_redis_server: RedisServer,
) -> None:
    """FLUSHALL keeps the subscription, and new writes may pass the follower's version before
    its next check: the store's epoch tells the new versions from the old ones."""
    url = fresh_redis_server.url
    async with started_store(url) as writer, started_store(url) as follower:
        await writer.create(record("old"))
        await until(lambda: "old" in follower.table.records, HONOURED_WITHIN, "old")
        with contextlib.closing(fresh_redis_server.client()) as admin:
            admin.flushall()
        for name in ("new-1", "new-2", "new-3"):
            await writer.create(record(name))
        await until(
            lambda: set(follower.table.records) == {"new-1", "new-2", "new-3"},
            3 * CHECK_INTERVAL + 1.0,
            "the new store, and nothing of the old",
        )


async def test_following_survives_a_redis_restart(
    fresh_redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.keys")
    url = fresh_redis_server.url
    async with started_store(url) as writer:
        await writer.create(record("before"))
        # Started on the store begun, it knows the store's epoch from its first read (one
        # that read it empty might not have learnt it yet, and could not tell a lost key
        # from a deleted one).
        async with started_store(url) as follower:
            assert "before" in follower.table.records
            fresh_redis_server.stop()
            fresh_redis_server.start()  # empty: nothing is persisted in these tests

            async def create_after() -> None:
                while True:
                    try:
                        await writer.create(record("after"))
                        return
                    except Exception:
                        await asyncio.sleep(0.05)

            await asyncio.wait_for(create_after(), 10)
            await until(lambda: "after" in follower.table.records, 5.0, "followed after restart")
            # The storage was emptied: the follower forgot "before" with it, and said so.
            await until(lambda: "before" not in follower.table.records, 5.0, "emptied storage")
    lost = [r for r in caplog.records if "no longer holds" in r.getMessage()]
    assert lost and all(r.levelno == logging.ERROR for r in lost)
    assert all("no longer holds 1 API keys" in r.getMessage() for r in lost)
    assert all(r.getMessage().endswith(": before") for r in lost)


async def test_a_key_deleted_from_a_store_begun_after_an_empty_read_is_no_alarm(
    fresh_redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A follower that read the store empty reads it in full once it has begun (a new epoch):
    a key it lacks then was deleted, not lost with an emptied store."""
    caplog.set_level(logging.INFO, logger="gateway.keys")
    url = fresh_redis_server.url
    async with started_store(url) as follower, started_store(url) as writer:
        await writer.create(record("short-lived"))
        await until(lambda: "short-lived" in follower.table.records, HONOURED_WITHIN, "created")
        with contextlib.closing(fresh_redis_server.client()) as admin:
            assert admin.client_kill_filter(_type="pubsub") >= 1
        await writer.delete("short-lived")
        await until(
            lambda: "short-lived" not in follower.table.records, 3 * CHECK_INTERVAL + 1.0, "gone"
        )
    assert not [r for r in caplog.records if "no longer holds" in r.getMessage()]


async def test_writes_after_a_redis_restart_all_succeed(fresh_redis_server: RedisServer) -> None:
    """The connections pooled before the restart are dead: each must be noticed before a write
    is sent on it (redis-py 8 skipped that check by default, and half the writes failed)."""
    async with started_store(fresh_redis_server.url) as store:
        await asyncio.gather(*(store.create(record(unique("before"))) for _ in range(20)))
        fresh_redis_server.stop()
        fresh_redis_server.start()
        writes = [store.create(record(unique("after"))) for _ in range(20)]
        results = await asyncio.gather(*writes, return_exceptions=True)
    assert [r for r in results if isinstance(r, BaseException)] == []


async def test_a_storage_down_at_start_answers_later(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    server = RedisServer(tmp_path_factory.mktemp("late-redis"))
    failed: list[str] = []
    store = create_key_store(StorageConfig(url=server.url, timeout=0.2), failed.append)
    try:
        await asyncio.wait_for(store.start(), 5)  # returns after the first failed try
        assert not store.table.loaded
        assert failed[:1] == ["key_subscribe"]  # counted (gateway_storage_errors_total)
        server.start()
        await until(lambda: store.table.loaded, 5.0, "loaded once Redis is up")
    finally:
        await store.close()
        server.stop()


async def test_a_storage_that_stays_down_is_told_once_then_its_return(
    tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Retried every 0.1-0.4 s, each failure was a warning: ~10 a second for two workers
    while Redis was down (a soak audit)."""
    caplog.set_level(logging.INFO, logger="gateway.keys")
    server = RedisServer(tmp_path_factory.mktemp("down-redis"))
    store = create_key_store(StorageConfig(url=server.url, timeout=0.2))
    try:
        await asyncio.wait_for(store.start(), 5)
        await asyncio.sleep(0.8)  # several tries: 0.1, 0.2, 0.4 s apart
        server.start()

        def told(what: str) -> list[str]:
            return [r.getMessage() for r in caplog.records if what in r.getMessage()]

        await until(lambda: bool(told("following the storage again")), 5.0, "its return told")
        assert len(told("following the storage failed")) == 1, told("")
    finally:
        await store.close()
        server.stop()


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
