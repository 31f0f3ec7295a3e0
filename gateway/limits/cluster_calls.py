"""The limiter's script calls (hits and refunds) on a Redis Cluster: each carries a deadline on
the clock of the node that runs it (`cluster_clocks`), and none is sent to a node that answers
nothing.

A node that gives no answer at all (frozen, or cut off by a network partition that resets
nothing) would make every call to it wait the whole `storage.timeout`, for as long as the
silence lasts, while the other nodes go on answering. So, once a call to a node has gone
unanswered within the timeout, a PING is sent to that node with the same timeout; when that
goes unanswered too, the node is silent: the calls whose key lives on it fail at once (nothing
is written to it), each starting a PING of its own unless one is on its way, and the first
PING the node answers ends it. The checks are made by the calls themselves, one at a time per
node: no traffic, no PINGs. Any other outcome of a PING (an answer, an error reply, a refused
or reset connection) ends it too: only silence is worth failing fast for; a refusal comes back
quickly by itself.

The registry's writes of a day's sets before a hit (`redis_registry`) go by the same rule: none
is sent to a silent node (the hit goes on without it), and one unanswered starts a PING.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.limits.base import StorageError
from gateway.limits.cluster_clocks import ClusterClocks, node_of
from gateway.limits.redis_clients import StorageGuard
from gateway.limits.redis_layout import Script, run_script
from gateway.tasks import STEP_TIMEOUT, stop_tasks

log = logging.getLogger(__name__)


class ClusterCalls:
    """Builds the limiter's script calls for its storage guard, and keeps track of the nodes
    that answer nothing (module docstring)."""

    __slots__ = ("_checks", "_clocks", "_closed", "_cluster", "_guard", "_silent", "_timeout")

    def __init__(self, cluster: RedisCluster, guard: StorageGuard, timeout: float) -> None:
        self._cluster = cluster
        self._guard = guard
        self._timeout = timeout
        self._clocks = ClusterClocks(cluster, timeout)
        # The names of the nodes whose last PING went unanswered: empty but during a silence,
        # so that a call to a cluster that answers pays one test of it.
        self._silent: set[str] = set()
        self._checks: dict[str, asyncio.Task[None]] = {}  # PINGs on their way, by node name
        self._closed = False  # a call that fails while the limiter closes starts no PING

    def script(
        self, operation: str, script: Script, keys: tuple[str, ...], args: tuple[int | str, ...]
    ) -> Callable[[], Awaitable[Any]]:
        """A call of `script` for the storage guard to run (`operation` names it), whose last
        argument is its deadline on the clock of the node that holds `keys`: that node's TIME,
        the first time, and the call share one storage timeout. Raises `StorageError` (counted
        as the guard counts it) at once when that node is silent."""
        if self._silent:
            self._refuse_if_silent(operation, keys[0])
        cluster = self._cluster
        clocks = self._clocks
        sent = asyncio.get_running_loop().time()

        async def call() -> Any:
            deadline = await clocks.deadline_us(keys[0], sent)
            return await run_script(cluster, script, keys, (*args, deadline))

        return call

    def learn(self, key: str, server_us: int) -> None:
        """The time (microseconds) a reply to a call of `key` carried."""
        self._clocks.learn(key, server_us)

    def failed(self, key: str, error: StorageError) -> None:
        """A call of `key` failed with `error`: when it went unanswered within the timeout,
        whether its node answers at all is checked (unless a check is on its way)."""
        if isinstance(error.__cause__, TimeoutError | RedisTimeoutError):
            node = node_of(self._cluster, key)
            if node is not None:
                self._check(node)

    def silent(self, key: str) -> bool:
        """Whether the node that holds `key` was found silent: a call to it would wait the
        whole timeout (a PING then checks again whether it answers, unless one is on its
        way)."""
        return bool(self._silent) and self._silent_node(key) is not None

    def _silent_node(self, key: str) -> str | None:
        node = node_of(self._cluster, key)
        if node is None or node not in self._silent:
            return None
        self._check(node)
        return node

    def _refuse_if_silent(self, operation: str, key: str) -> None:
        node = self._silent_node(key)
        if node is None:
            return
        silent = RedisConnectionError(
            f"the Redis Cluster node {node} did not answer a PING within the timeout; "
            "checking again"
        )
        raise self._guard.error(operation, silent)

    def _check(self, node: str) -> None:
        if node in self._checks or self._closed:
            return
        check = asyncio.get_running_loop().create_task(self._ping(node))
        self._checks[node] = check
        check.add_done_callback(lambda _: self._checks.pop(node, None))

    async def _ping(self, name: str) -> None:
        node = self._cluster.get_node(node_name=name)
        if node is None:  # gone from the slot map: its slots' calls go to their new node
            self._silent.discard(name)
            return
        try:
            async with asyncio.timeout(self._timeout):
                # On the node's own pool, past the cluster client's handling of failures (a
                # relearning of the map, at most every RELEARN_SECONDS, would follow each).
                await node.execute_command("PING")
        except (TimeoutError, RedisTimeoutError):
            if name not in self._silent:
                log.warning(
                    "Redis Cluster node %s answers nothing within %.3fs: limit checks for its "
                    "slots fail at once until it answers a PING",
                    name,
                    self._timeout,
                )
                self._silent.add(name)
            return
        except Exception as exc:  # an answer of some kind: not silent
            log.debug("PING to Redis Cluster node %s: %r", name, exc)
        if name in self._silent:
            log.info("Redis Cluster node %s answers again", name)
            self._silent.discard(name)

    async def close(self) -> None:
        self._closed = True
        await stop_tasks(list(self._checks.values()), STEP_TIMEOUT, "a PING to a cluster node")
