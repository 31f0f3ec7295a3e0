"""Each Redis Cluster node's clock, for the deadlines of the limit checks sent to it.

A check carries a deadline on the clock of the server that runs it (limits/redis_clock.py). On a
single Redis the pipeline learns that clock from a `TIME` as it connects. On a cluster each
check is a redis-py call to whichever node holds its subject, and each node has a clock of its
own: before the first check sent to a node this asks that node's `TIME`, so that no check goes
out without a deadline (a stalled node would otherwise run it when it wakes, charging a request
answered 503), and the time every reply carries keeps the clock fresh.
"""

from __future__ import annotations

import asyncio

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from gateway.limits.redis_clock import RedisClock, time_reply_us

# Node names remembered at most: nodes come and go over a long life (failovers, resharding).
_MAX_NODES = 1024


class ClusterClocks:
    """The clocks of a cluster's nodes, by node name."""

    __slots__ = ("_clocks", "_cluster", "_waited")

    def __init__(self, cluster: RedisCluster, waited: float) -> None:
        self._cluster = cluster
        self._waited = waited  # how long the limiter waits for a check (the storage timeout)
        self._clocks: dict[str, RedisClock] = {}

    async def deadline_us(self, key: str, sent: float) -> int:
        """The deadline of a check of `key` sent at loop time `sent`, on the clock of the node
        that holds `key` (0, none, for a slot no node covers: that check fails anyway). The
        caller runs this and the check under one storage timeout: a node that cannot tell its
        time within it would fare no better with the check."""
        cluster = self._cluster
        node = node_of(cluster, key)
        if node is None:
            return 0
        clock = self._clocks.get(node)
        if clock is None:
            clock = await self._learn_time(cluster, node)
        return clock.deadline_us(sent, self._waited)

    def learn(self, key: str, server_us: int) -> None:
        """The time (microseconds) a reply to a check of `key` carried."""
        node = node_of(self._cluster, key)
        if node is not None:
            clock = self._clocks.get(node) or self._remember(node)
            clock.learn(server_us, asyncio.get_running_loop().time())

    async def _learn_time(self, cluster: RedisCluster, node: str) -> RedisClock:
        # Several first checks of a node at once each ask: a few round trips, once.
        target = cluster.get_node(node_name=node)
        if target is None:
            return RedisClock()  # not in the slot map node_of just read: cannot happen
        reply = await cluster.execute_command("TIME", target_nodes=target)
        clock = self._remember(node)
        clock.learn(time_reply_us(reply), asyncio.get_running_loop().time(), new_server=True)
        return clock

    def _remember(self, node: str) -> RedisClock:
        if len(self._clocks) >= _MAX_NODES:
            self._clocks.clear()
        clock = self._clocks[node] = RedisClock()
        return clock


def node_of(cluster: RedisCluster, key: str) -> str | None:
    """The name of the node that holds `key`, or None while the client has no slot map yet
    (or the slot is not covered: the call itself will say what is wrong)."""
    try:
        node = cluster.get_node_from_key(key)
    except (RedisError, RedisClusterException):
        return None
    return None if node is None else str(node.name)
