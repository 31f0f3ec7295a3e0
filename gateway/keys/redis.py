"""API keys in Redis, Redis Cluster or a Sentinel-watched Redis, shared by every gateway
process using that storage (clients from `gateway.limits.redis_clients`, as the limiter's).

Layout: every key of the store carries the hash tag `{gw:keys}`, so on a cluster they all
live in one slot and `write.lua` can change them together:

    gw:{gw:keys}:records   hash  key name -> the key's record (JSON)
    gw:{gw:keys}:owners    hash  secret digest -> key name (a secret belongs to one key)
    gw:{gw:keys}:version   string, bumped by every change
    gw:{gw:keys}:log       sorted set, the newest 10,000 changes: "VERSION\\nNAME" by version
    gw:{gw:keys}:epoch     string, set when the version starts at 1 (a new or emptied store)

and each change is announced on the channel `gw:{gw:keys}:changes` as
"VERSION\\nNAME\\nRECORD" (RECORD empty for a deletion), the one that begins the store
(version 1) just after "0\\n\\nEPOCH"; a store in database N > 0 of its server announces on
`gw:{gw:keys}:changes:N` (`changes_channel`). On a cluster PUBLISH reaches
every node, so a process subscribes on one of them (the one holding the key store).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool

from gateway.keys.backend import (
    Change,
    KeyWrite,
    Missed,
    RefusalReason,
    Subscription,
    WriteRefused,
)
from gateway.limits.base import StorageError
from gateway.limits.cluster_clocks import ClusterClocks
from gateway.limits.redis_clients import StorageGuard, StorageRedis, open_storage_redis
from gateway.limits.redis_clock import RedisClock, time_reply_us
from gateway.limits.redis_layout import Script, run_script

WRITE = Script("write.lua", "gateway.keys")
CHANGES = Script("changes.lua", "gateway.keys")

RECORDS_KEY = "gw:{gw:keys}:records"
OWNERS_KEY = "gw:{gw:keys}:owners"
VERSION_KEY = "gw:{gw:keys}:version"
LOG_KEY = "gw:{gw:keys}:log"
EPOCH_KEY = "gw:{gw:keys}:epoch"
CHANNEL = "gw:{gw:keys}:changes"
_LOAD_BATCH = 500  # records per HSCAN: the event loop serves requests between batches
_REFUSALS: tuple[RefusalReason, ...] = ("name_taken", "secret_taken", "not_found", "changed")
# How long an admin call's read or write of a key waits for the storage, at the least.
# `storage.timeout` is sized for the proxy's hot path, where a request must not wait; an
# operator's call is not latency-bound, and a 503 for a write that a busy moment delayed
# (a loaded machine, a collection in the worker) costs a retry. The write stays safe: its
# deadline on Redis's clock follows this wait (four fifths of it), so one that Redis runs after
# the gateway gave up still changes nothing.
ADMIN_WAIT = 1.0


def changes_channel(database: int) -> str:
    """The channel a store in `database` announces its changes on. Pub/sub ignores databases
    (a PUBLISH reaches every subscriber of the server): on one channel, a process followed the
    changes of a store in another database as its own, by their versions. Database 0 keeps
    the channel it always had, so a gateway there and one of an earlier version still hear
    each other during a rolling upgrade."""
    return CHANNEL if database == 0 else f"{CHANNEL}:{database}"


class RedisKeyBackend:
    shared = True

    def __init__(
        self,
        storage: StorageRedis,
        timeout: float,
        on_storage_error: Callable[[str], None] | None = None,
    ) -> None:
        self._storage = storage.share()
        self._client = storage.client
        self._channel = changes_channel(_database_of(self._client))
        self._timeout = timeout
        self._guard = StorageGuard(self._client, timeout, "key store", on_storage_error)
        self._admin_wait = max(timeout, ADMIN_WAIT)
        self._admin_guard = StorageGuard(
            self._client, self._admin_wait, "key store", on_storage_error
        )
        # The clock of the server that holds the key store, for the writes' deadlines: on a
        # cluster, of the node that holds its slot (asked as the limiter asks it).
        self._redis_clock = RedisClock()
        self._node_clocks = (
            ClusterClocks(self._client, self._admin_wait)
            if isinstance(self._client, RedisCluster)
            else None
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        timeout: float,
        on_storage_error: Callable[[str], None] | None = None,
        redis: StorageRedis | None = None,
    ) -> RedisKeyBackend:
        """`on_storage_error(operation)` counts failures (operations: key_write, key_read,
        key_version, key_load, key_subscribe); `redis`: the worker's clients of `url`, shared
        with its limiter."""
        return cls(redis or open_storage_redis(url, timeout), timeout, on_storage_error)

    async def write(self, write: KeyWrite) -> tuple[int, str | None]:
        keys = (RECORDS_KEY, OWNERS_KEY, VERSION_KEY, LOG_KEY, EPOCH_KEY)
        loop = asyncio.get_running_loop()

        async def written() -> Any:
            # A deadline on Redis's clock, as a limit check's: a write answered 503 (not
            # waited for any more) must not be made later by a Redis that wakes from a stall,
            # which made a created key whose secret nobody was given.
            deadline = await self._deadline(loop.time())
            args: tuple[str | int, ...] = (
                self._channel,
                write.name,
                write.expected or "",
                write.record or "",
                deadline,
                len(write.add_digests),
                *write.add_digests,
                *write.remove_digests,
            )
            return await run_script(self._client, WRITE, keys, args)

        # The epoch only on success (version 1): a refusal returns the first three.
        version, outcome, redis_us, *begun = await self._admin_guard("key_write", written)
        if self._node_clocks is not None:
            self._node_clocks.learn(RECORDS_KEY, int(redis_us))
        else:
            self._redis_clock.learn(int(redis_us), loop.time())
        outcome = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
        if outcome == "too_late":
            late = StorageError("it ran after its deadline on Redis's clock; nothing was written")
            raise self._admin_guard.error("key_write", late)
        if outcome != "ok":
            reason: RefusalReason = next(
                (known for known in _REFUSALS if known == outcome), "changed"
            )
            raise WriteRefused(reason)
        return int(version), _text(begun[0]) or None

    async def _deadline(self, sent: float) -> int:
        """The deadline, on the key store's server's clock, of a write sent at loop time
        `sent`; that clock is asked for (TIME) before the process's first write."""
        if self._node_clocks is not None:
            return await self._node_clocks.deadline_us(RECORDS_KEY, sent)
        if not self._redis_clock.deadline_us(sent, self._admin_wait):
            reply = await self._client.time()
            loop_time = asyncio.get_running_loop().time()
            self._redis_clock.learn(time_reply_us(reply), loop_time, new_server=True)
        return self._redis_clock.deadline_us(sent, self._admin_wait)

    async def read(self, name: str) -> str | None:
        # An admin call's (GET, and the read before each rewrite): its wait, as a write's.
        read = functools.partial(self._client.hget, RECORDS_KEY, name)
        raw = await self._admin_guard("key_read", read)
        return None if raw is None else _text(raw)

    async def state(self) -> tuple[int, str]:
        # One round trip: the two keys share a hash tag, so a Cluster's MGET takes them too.
        version, epoch = await self._guard(
            "key_version", lambda: self._client.mget(VERSION_KEY, EPOCH_KEY), repeatable=True
        )
        return int(version or 0), "" if epoch is None else _text(epoch)

    async def missed(self, after: int) -> Missed:
        keys = (VERSION_KEY, EPOCH_KEY, LOG_KEY)
        reply = await self._guard(
            "key_version", lambda: run_script(self._client, CHANGES, keys, (after,))
        )
        version, epoch = int(reply[0]), _text(reply[1])
        names: list[str] = []
        for expected, entry in enumerate(reply[2:], start=after + 1):
            logged, name = _text(entry).split("\n", 1)
            if int(logged) != expected:
                return Missed(version, epoch, None)  # trimmed, or written without a log
            names.append(name)
        if version > after and after + len(names) != version:
            return Missed(version, epoch, None)
        return Missed(version, epoch, names)

    async def read_many(self, names: list[str]) -> list[str | None]:
        found: list[str | None] = []
        for start in range(0, len(names), _LOAD_BATCH):
            batch = names[start : start + _LOAD_BATCH]
            read = functools.partial(self._client.hmget, RECORDS_KEY, batch)
            records: list[Any] = await self._guard("key_read", read, repeatable=True)
            found += [None if raw is None else _text(raw) for raw in records]
        return found

    async def load(self) -> AsyncIterator[list[tuple[str, str]]]:
        cursor = 0
        while True:
            scan = functools.partial(self._client.hscan, RECORDS_KEY, cursor, count=_LOAD_BATCH)
            reply: Any = await self._guard("key_load", scan)
            cursor, found = int(reply[0]), reply[1]
            yield [(_text(name), _text(record)) for name, record in found.items()]
            if cursor == 0:
                return

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Subscription]:
        subscriber = await self._subscriber()
        pubsub = subscriber.pubsub()
        try:
            await self._guard("key_subscribe", lambda: _subscribed(pubsub, self._channel))
            yield _RedisSubscription(pubsub, subscriber.connection_pool)
        finally:
            # Bounded: closing must not hold up a worker's shutdown on a storage that hangs.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                    if subscriber is not self._client:
                        await subscriber.aclose()
                        await subscriber.connection_pool.aclose()

    async def _subscriber(self) -> Redis:
        """The client to subscribe with: the storage's own, or on a cluster a plain client
        of the node that holds the key store (a PUBLISH reaches every node, so one is
        enough; a plain connection also needs no cluster pub/sub support from redis-py)."""
        client = self._client
        if not isinstance(client, RedisCluster):
            return client
        await self._guard("key_subscribe", client.initialize)
        node = client.get_node_from_key(VERSION_KEY)
        if node is None:
            raise StorageError("key subscribe: no cluster node serves the key store's slot")
        pool = ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs)
        return Redis(connection_pool=pool)

    async def close(self) -> None:
        await self._guard.settle()
        await self._admin_guard.settle()
        await self._storage.aclose()


def _database_of(client: Redis | RedisCluster) -> int:
    """The database number a client's commands go to (a Sentinel's master too; a cluster has
    only database 0)."""
    if isinstance(client, RedisCluster):
        return 0
    return int(client.connection_pool.connection_kwargs.get("db") or 0)


async def _subscribed(pubsub: PubSub, channel: str) -> None:
    """Subscribe and wait for the server's confirmation (the caller bounds the wait): a change
    made after it is announced to us, so reading the version after this misses nothing."""
    await pubsub.subscribe(channel)
    while True:
        message = await pubsub.get_message(timeout=None)
        if message is not None and message["type"] == "subscribe":
            return


class _RedisSubscription:
    def __init__(self, pubsub: PubSub, pool: ConnectionPool) -> None:
        self._pubsub = pubsub
        self._begun: str | None = None  # announced just before the change of version 1
        # A Sentinel master's pool learns where the master is (the storage's clients ask the
        # Sentinels every 0.5 s); any other server does not move.
        self._sentinel_pool = pool if isinstance(pool, SentinelConnectionPool) else None

    def moved(self) -> bool:
        # The subscription's connection is its own, never given back to the pool: the pool
        # drops its connections to an old master, not this one. Left there after a
        # failover ordered while the old master lives on (as a replica), it heard nothing
        # until that replica had synced with the new master, and each change made meanwhile
        # waited for the version check to find it.
        if self._sentinel_pool is None:
            return False
        master = self._sentinel_pool.master_address
        connection = self._pubsub.connection
        if master is None or connection is None:
            return False
        return (connection.host, connection.port) != (master[0], int(master[1]))

    async def next(self, within: float) -> Change | None:
        message = await self._pubsub.get_message(timeout=within)
        if message is None or message["type"] != "message":
            return None
        version, name, record = _text(message["data"]).split("\n", 2)
        if version == "0":  # "0\n\nEPOCH": the store begins, its version 1 comes next
            self._begun = record
            return None
        begun, self._begun = self._begun, None
        return Change(int(version), name, record or None, begun if version == "1" else None)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
