"""The Redis clients of one `storage.url`, for everything the gateway keeps in the storage.

This is the one place that turns a storage URL into connections (the URL grammar is in
`gateway.config.storage_url`):

- `client`: a redis-py client for every call that is not a request's hit (usage, reset,
  ping, the key store). For a Sentinel URL it is a client of the master, whose pool asks the
  Sentinels for the master's address on each new connection and drops its connections when a
  server answers as a replica. That alone misses a failover ordered while the old master is
  alive: the old master goes on taking writes until the Sentinels demote it (up to about
  10 s), so `StorageRedis` also asks the Sentinels every `MASTER_RECHECK_SECONDS` and has the
  pool drop its idle connections when the master moved.
- `address()`: where the master is now, for a connection of one's own (the limiter's hits
  connection, `gateway.limits.resp`). For a Sentinel URL it asks the Sentinels each time, so
  a caller that reconnects after an error finds the promoted master.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from gateway.config.storage_url import SENTINEL_SCHEMES, parse_sentinel_url

AnyRedis = Redis | RedisCluster

_CLUSTER_SCHEMES = {"redis+cluster://": "redis://", "rediss+cluster://": "rediss://"}

# How often a connection to a Sentinel-named master checks that it is still the one named.
MASTER_RECHECK_SECONDS = 0.5

log = logging.getLogger(__name__)


class StorageRedis:
    """The clients of one storage URL; the last `aclose` closes all of them.

    One worker opens them once and hands them to the limiter and the key store, each of which
    calls `share()` to take its part and `aclose()` when it is done with it. Made on a running
    event loop with a Sentinel URL, it follows the master in the background (see the module's
    docstring) until closed.
    """

    def __init__(
        self, client: AnyRedis, sentinel: Sentinel | None = None, timeout: float = 0.25
    ) -> None:
        self.client = client
        self._sentinel = sentinel
        self._timeout = timeout
        self._users = 0  # holders that have not closed their part yet (see share)
        self._follower: asyncio.Task[None] | None = None
        if sentinel is not None:
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to follow with
                self._follower = asyncio.get_running_loop().create_task(self._follow_master())

    async def _follow_master(self) -> None:
        while True:
            await asyncio.sleep(MASTER_RECHECK_SECONDS)
            try:
                async with asyncio.timeout(self._timeout):
                    await self.address()  # drops the pool's idle connections if it moved
            except Exception as exc:  # Sentinels away: the next round asks again
                log.debug("asking the Sentinels for the master failed: %s", exc)

    @property
    def master_moves(self) -> bool:
        """Whether the master's address may change under a running gateway (Sentinel)."""
        return self._sentinel is not None

    @property
    def is_cluster(self) -> bool:
        return isinstance(self.client, RedisCluster)

    async def address(self) -> tuple[str, int]:
        """The master's host and port now (a single Redis: the URL's)."""
        client = self.client
        if isinstance(client, RedisCluster):
            raise TypeError("a cluster has no single address")
        pool = client.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            # Also makes the pool drop idle connections when the master moved.
            host, port = await pool.get_master_address()  # type: ignore[no-untyped-call]
            return str(host), int(port)
        settings = pool.connection_kwargs
        return str(settings.get("host", "localhost")), int(settings.get("port", 6379))

    def share(self) -> StorageRedis:
        """Take a part in these clients; each part is given back by one `aclose`."""
        self._users += 1
        return self

    async def aclose(self) -> None:
        self._users -= 1
        if self._users > 0:
            return  # another holder still uses them
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        try:
            await self.client.aclose()
        finally:
            if self._sentinel is not None:
                # One by one: Sentinel.aclose is recent in redis-py; its clients' is not.
                for sentinel_client in self._sentinel.sentinels:
                    await sentinel_client.aclose()


def open_storage_redis(url: str, timeout: float) -> StorageRedis:
    """The clients for `url` (any Redis scheme of the storage URL); nothing connects yet.

    Every call on them is expected to run under an asyncio timeout of `timeout` (the
    limiter's `_guard`): redis-py's own socket timeout would add a timer to every read and
    write, and its retries would stretch a failing call past the storage timeout.
    """
    for cluster_scheme, plain_scheme in _CLUSTER_SCHEMES.items():
        if url.startswith(cluster_scheme):
            return StorageRedis(
                RedisCluster.from_url(
                    plain_scheme + url[len(cluster_scheme) :],
                    socket_timeout=timeout,
                    socket_connect_timeout=timeout,
                )
            )
    options: dict[str, Any] = {
        "socket_timeout": None,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if url.startswith(tuple(f"{scheme}://" for scheme in SENTINEL_SCHEMES)):
        parts = parse_sentinel_url(url)
        # Sentinel replies are small and rare (one per new connection): a socket timeout
        # there keeps a hung Sentinel from holding a reconnection beyond the storage timeout.
        sentinel_options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
        }
        if parts.tls:
            sentinel_options["ssl"] = True
        sentinel = Sentinel(list(parts.sentinels), sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
        master = sentinel.master_for(
            parts.master,
            redis_class=Redis,
            db=parts.db,
            username=parts.username,
            password=parts.password,
            ssl=parts.tls,
            **options,
        )
        return StorageRedis(cast(Redis, master), sentinel, timeout)
    if url.startswith(("redis://", "rediss://")):
        return StorageRedis(Redis.from_url(url, **options))
    raise ValueError(f"not a Redis URL: {url!r}")
