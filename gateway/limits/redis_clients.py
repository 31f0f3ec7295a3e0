"""The Redis clients of one `storage.url`, for everything the gateway keeps in the storage.

This is the one place that turns a storage URL into connections (the URL grammar is in
`gateway.config.storage_url`):

- `client`: a redis-py client for every call that is not a request's hit (usage, reset,
  ping, the key store). For a Sentinel URL it is a client of the master, whose pool asks the
  Sentinels for the master's address on each new connection and drops its connections when a
  server answers as a replica. That alone misses a failover ordered while the old master is
  alive: the old master goes on taking writes until the Sentinels demote it (up to about
  10 s), so `StorageRedis` also asks the Sentinels every `MASTER_RECHECK_SECONDS` and has the
  pool drop its idle connections when the master moved. A connection that was in use at that
  moment is dropped when it comes back to the pool (`_MasterFollowingPool`): left idle, it
  would go on writing to the old master.
- `address()`: where the master is now, for a connection of one's own (the limiter's hits
  connection, `gateway.limits.resp`). For a Sentinel URL it asks the Sentinels each time, so
  a caller that reconnects after an error finds the promoted master.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config.storage_url import SENTINEL_SCHEMES, parse_cluster_url, parse_sentinel_url
from gateway.limits.base import StorageError
from gateway.limits.redis_cluster import ClusterClient
from gateway.tasks import STEP_TIMEOUT, finish_within, stop_tasks

AnyRedis = Redis | RedisCluster

_CLUSTER_SCHEMES = {"redis+cluster://": "redis://", "rediss+cluster://": "rediss://"}

# How often a connection to a Sentinel-named master checks that it is still the one named.
MASTER_RECHECK_SECONDS = 0.5

log = logging.getLogger(__name__)

T = TypeVar("T")


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
        self._closed = False  # ends `_follow_master` should its cancellation be lost
        if sentinel is not None:
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to follow with
                self._follower = asyncio.get_running_loop().create_task(self._follow_master())

    async def _follow_master(self) -> None:
        # Not `while True`: a Sentinel command can lose the cancellation (see gateway.tasks).
        while not self._closed:
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
        self._closed = True
        follower, self._follower = self._follower, None
        await stop_tasks([follower], STEP_TIMEOUT, "following the Sentinels' master")
        # Each close bounded: a storage that hangs must not hold up a worker's exit.
        try:
            if isinstance(self.client, ClusterClient):
                closing = self.client.close_for_good()
            else:
                closing = self.client.aclose()
            await finish_within(closing, STEP_TIMEOUT, "closing the storage client")
        finally:
            if self._sentinel is not None:
                # One by one: Sentinel.aclose is recent in redis-py; its clients' is not.
                for sentinel_client in self._sentinel.sentinels:
                    closing = sentinel_client.aclose()
                    await finish_within(closing, STEP_TIMEOUT, "closing a Sentinel client")


class StorageGuard:
    """Runs the storage calls of one user of a client (the limiter, the key store): each within
    the storage timeout, and every failure counted and raised as `StorageError`.

    `label` starts the failures' messages ("limit storage"); `on_error(operation)` counts
    them (gateway_storage_errors_total).
    """

    __slots__ = ("_calls", "_client", "_is_cluster", "_label", "_on_error", "_timeout")

    def __init__(
        self,
        client: AnyRedis,
        timeout: float,
        label: str,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self._client = client
        self._is_cluster = isinstance(client, RedisCluster)
        self._timeout = timeout
        self._label = label
        self._on_error = on_error
        self._calls: set[asyncio.Task[Any]] = set()  # under way, those left behind included

    async def __call__(
        self,
        operation: str,
        call: Callable[[], Awaitable[T]],
        *,
        repeatable: bool = False,
        within: float | None = None,
    ) -> T:
        """Run one storage call within the timeout (`within` seconds, when given: what is left
        of it after an earlier call); any failure becomes StorageError.

        A `repeatable` call (one that does the same when run twice: a read, SADD, HDEL) is
        run once more within the same timeout when its connection turns out to be dead: a
        pooled connection to a Redis that restarted fails its first command, and the pool
        only notices then.

        The call runs as a task of its own, left behind (cancelled, not waited for) when the
        timeout passes: the cluster client cleans up after some errors by closing every
        node's connections and pausing before it gives up, and a caller waiting for that was
        kept more than five times the timeout (a failover audit measured 1.4 s against
        250 ms while a master restarted)."""
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._run(call, repeatable))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        # One future woken by whichever comes first, the call's end or the timeout: half the
        # cost of asyncio.wait, which every call on a Redis Cluster (each hit) pays.
        woken = loop.create_future()
        task.add_done_callback(functools.partial(_wake, woken))
        timer = loop.call_later(self._timeout if within is None else within, _wake, woken, None)
        try:
            await woken
        except asyncio.CancelledError:
            task.cancel()
            task.add_done_callback(_left_behind)
            raise
        finally:
            timer.cancel()
        if not task.done():
            task.cancel()
            task.add_done_callback(_left_behind)
            # As its cause, so that a caller can tell silence from a refusal (ClusterCalls).
            timed_out = TimeoutError()
            raise self.error(operation, timed_out) from timed_out
        failure = task.exception()
        if isinstance(failure, Exception):
            raise self.error(operation, failure) from failure
        return task.result()

    async def settle(self) -> None:
        """Cancel the calls still under way, those left behind by a timeout included, and wait
        for them (at most the timeout), before the client is closed: a cluster call that the
        close interrupts is retried by redis-py, which initialises the client again and
        connects to every node after the close, for good (a test run hung on such sockets)."""
        calls = list(self._calls)
        for task in calls:
            task.cancel()
        if calls:
            await asyncio.wait(calls, timeout=self._timeout)

    async def _run(self, call: Callable[[], Awaitable[T]], repeatable: bool) -> T:
        if self._is_cluster:
            # Commands sent before the client knows the slot map are routed to an arbitrary
            # node, and the reinitialisation their MOVED replies trigger closes connections
            # under concurrent calls (redis-py 8 raises AttributeError there). Learning the
            # map first avoids both; it is a no-op once the map is known.
            await cast(RedisCluster, self._client).initialize()
        try:
            return await call()
        except RedisConnectionError:
            if not repeatable:
                raise
            return await call()

    def error(self, operation: str, exc: Exception) -> StorageError:
        """Count the failure; whatever the client raised, from its own errors to the odd
        internal one under a broken connection, the caller must see StorageError."""
        if self._on_error is not None:
            self._on_error(operation)
        reason = (
            "timed out"
            if isinstance(exc, TimeoutError | RedisTimeoutError)
            else str(exc) or type(exc).__name__
        )
        return StorageError(f"{self._label} {operation}: {reason}")


class _MasterFollowingPool(SentinelConnectionPool):
    """A Sentinel master's pool that never keeps a connection to a server other than the master
    it last heard of.

    redis-py drops only the idle connections when it learns that the master moved; one that a
    call was using then came back to the pool still connected to the old master, and every
    call that took it wrote there until the Sentinels demoted that server (CI saw the storage
    client write to the old master for the whole 5 s its test allows)."""

    async def release(self, connection: Any) -> None:
        master = self.master_address
        if (
            self.is_master
            and master is not None
            and connection.is_connected
            and (connection.host, connection.port) != (master[0], int(master[1]))
        ):
            await connection.disconnect()
        await super().release(connection)


def _wake(woken: asyncio.Future[None], _task: object) -> None:
    if not woken.done():
        woken.set_result(None)


def _left_behind(task: asyncio.Task[Any]) -> None:
    # Its caller has moved on (a timeout reported, or cancelled): taking its failure keeps
    # asyncio from logging it as never retrieved.
    if not task.cancelled():
        task.exception()


def _without_maint_notifications() -> dict[str, Any]:
    """redis-py 8's pools skip their check of a pooled connection before handing it out (has
    the server closed it?) while "maintenance notifications" are on, and their default, "auto",
    counts as on. Then every connection pooled before a Redis restart fails its next command
    (measured: 10 of 20 writes refused with 503 after a restart). Turned off, where redis-py
    knows them (they are for Redis Enterprise's maintenance events, not used here)."""
    try:
        from redis.maint_notifications import MaintNotificationsConfig
    except ImportError:  # redis-py before 7: no such notifications, and the check always runs
        return {}
    return {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}


_NO_MAINT_NOTIFICATIONS = _without_maint_notifications()


def open_storage_redis(url: str, timeout: float) -> StorageRedis:
    """The clients for `url` (any Redis scheme of the storage URL); nothing connects yet.

    Every call on them is expected to run under an asyncio timeout of `timeout` (a
    `StorageGuard`): redis-py's own socket timeout would add a timer to every read and
    write, and its retries would stretch a failing call past the storage timeout.
    """
    for cluster_scheme, plain_scheme in _CLUSTER_SCHEMES.items():
        if url.startswith(cluster_scheme):
            cluster_options: dict[str, Any] = {
                "socket_timeout": timeout,
                "socket_connect_timeout": timeout,
                # A command whose connection failed is not sent again: a script that ran
                # before the failure (a hit, a refund, a key write) would run twice. An
                # audit moving a slot under load saw admissions charged twice and refunds
                # given back twice that way, nothing counted. Reads are repeated by
                # StorageGuard (`repeatable`) instead; MOVED and ASK, which say a command
                # did not run, are still followed.
                "retry": Retry(NoBackoff(), 0),
                # MOVED moves the one slot in the client's map, rather than every fifth
                # closing the connections to every node, calls on their way included.
                "reinitialize_steps": 0,
            }
            rest = url[len(cluster_scheme) :]
            if "," not in rest.partition("/")[0]:
                return StorageRedis(ClusterClient.from_url(plain_scheme + rest, **cluster_options))
            # Several nodes named: the cluster is learnt from the first that answers.
            seeds = parse_cluster_url(url)
            return StorageRedis(
                ClusterClient(
                    startup_nodes=[ClusterNode(host, port) for host, port in seeds.nodes],
                    username=seeds.username,
                    password=seeds.password,
                    ssl=seeds.tls,
                    **cluster_options,
                )
            )
    options: dict[str, Any] = {
        "socket_timeout": None,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        **_NO_MAINT_NOTIFICATIONS,
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
            connection_pool_class=_MasterFollowingPool,
            **options,
        )
        return StorageRedis(cast(Redis, master), sentinel, timeout)
    if url.startswith(("redis://", "rediss://")):
        return StorageRedis(Redis.from_url(url, **options))
    raise ValueError(f"not a Redis URL: {url!r}")
