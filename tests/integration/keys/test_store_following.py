"""How a key store follows the storage when something goes wrong: a lost announcement, a dropped
subscription, a change log that does not reach back, a store emptied or begun, a Redis restarted
or down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from gateway.config.model import StorageConfig
from gateway.keys import KeyStore, create_key_store
from gateway.keys.backend import Change, Subscription
from gateway.keys.redis import (
    CHANNEL,
    EPOCH_KEY,
    LOG_KEY,
    OWNERS_KEY,
    RECORDS_KEY,
    VERSION_KEY,
    WRITE,
    RedisKeyBackend,
)
from gateway.keys.store import CHECK_INTERVAL, RECHECK_AHEAD
from gateway.limits.redis_clients import open_storage_redis
from tests.support.key_store import HONOURED_WITHIN, record, started_store, unique, until
from tests.support.redis_servers import RedisServer


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


class _StallingBackend(RedisKeyBackend):
    """The real backend, in a process that stalls (its event loop held, as by a busy machine or
    a long collection) just after a version check found the storage ahead of it: the
    announcements on their way then wait, unread in the subscription's socket, past the
    recheck that would call them lost."""

    def __init__(self, url: str) -> None:
        super().__init__(open_storage_redis(url, 1.0), 1.0)
        self.store: KeyStore | None = None
        self.armed = False  # stall after the next check that finds the storage ahead
        self.stalled = False
        self.stall_now = False
        self.checks_after_stall = 0

    async def state(self) -> tuple[int, str]:
        version, epoch = await super().state()
        if self.stalled:
            self.checks_after_stall += 1
        elif self.armed and self.store is not None and version > self.store.known_version:
            self.armed = False
            self.stalled = self.stall_now = True  # the next look at the subscription stalls
        return version, epoch

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Subscription]:
        async with super().subscribe() as subscription:
            yield _StallingSubscription(subscription, self)


class _StallingSubscription:
    def __init__(self, subscription: Subscription, backend: _StallingBackend) -> None:
        self._subscription = subscription
        self._backend = backend

    async def next(self, within: float) -> Change | None:
        if self._backend.stall_now:
            self._backend.stall_now = False
            time.sleep(2 * RECHECK_AHEAD)  # noqa: ASYNC251 - the loop held past the recheck
        return await self._subscription.next(within)

    def moved(self) -> bool:
        return self._subscription.moved()


async def test_announcements_held_up_in_a_stalled_process_are_not_taken_for_lost(
    fresh_redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker held up (machine load 5-6, a long collection) read the announcements that
    had arrived meanwhile only after its recheck of the version, which called one lost: a new
    subscription and a catch-up each time (an audit creating 100,000 keys saw several). The
    recheck takes what has arrived before it judges."""
    async with started_store(fresh_redis_server.url) as writer:
        await writer.create(record(unique("first")))  # the store begun: its epoch is read
    backend = _StallingBackend(fresh_redis_server.url)
    follower = KeyStore(backend)
    backend.store = follower
    await follower.start()
    names = [unique("held-up") for _ in range(3)]
    try:
        with contextlib.closing(fresh_redis_server.client()) as admin:
            subscribed = admin.info("commandstats")["cmdstat_subscribe"]["calls"]
            caplog.set_level("INFO", logger="gateway.keys")
            backend.armed = True
            keys = (RECORDS_KEY, OWNERS_KEY, VERSION_KEY, LOG_KEY, EPOCH_KEY)
            for name in names:  # written and announced as write.lua does, while the loop waits
                made = record(name)
                admin.eval(WRITE.text, 5, *keys, CHANNEL, name, "", made.to_json(), 0, 1,
                              made.key_sha256)  # fmt: skip
            time.sleep(CHECK_INTERVAL + RECHECK_AHEAD)  # noqa: ASYNC251 - the loop held
            await until(lambda: backend.checks_after_stall > 0, 5 * CHECK_INTERVAL, "recheck")
            assert all(name in follower.table.records for name in names)
            lost = [r.getMessage() for r in caplog.records if "was lost" in r.getMessage()]
            assert not lost
            assert admin.info("commandstats")["cmdstat_subscribe"]["calls"] == subscribed
    finally:
        await follower.close()
