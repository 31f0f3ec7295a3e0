"""The Redis Cluster client: redis-py's, but a sick node costs only the calls that go to it.

redis-py's cluster client relearns the whole cluster (CLUSTER SLOTS from the nodes, its slot
map of 16,384 entries rebuilt in Python, under a lock every call waits on) after every call
that fails to connect, and closes every node's connections after every CLUSTERDOWN or
uncovered slot. While one master is down and requests for its slots keep coming, that is a
relearning per failed call, and the calls to the healthy masters queue behind it: measured
with `cluster-require-full-coverage no`, 4,000 calls a second on a healthy master fell to
125 while four callers kept calling the dead one.

`ClusterClient` keeps serving from the map it has and relearns it in the background instead,
at most once every `RELEARN_SECONDS`; nothing is closed but the failed node's idle
connections (redis-py's own handling of a connection error). A call to the failed node
fails (503 within `storage.timeout`, or `on_error`), the others go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.asyncio.cluster import RedisCluster

# The least time between two relearnings of the slot map after failures. A failover shows in
# the map within this of the promotion (the first relearning after a quiet spell starts at
# once); each costs a round trip and a few milliseconds of the worker's CPU. At 0.5 s a
# failover audit saw the promoted replica served 0.1-0.55 s later than redis-py's own client
# found it (10-18% more 503s for its slots).
RELEARN_SECONDS = 0.25

log = logging.getLogger(__name__)


class ClusterClient(RedisCluster):
    """A cluster client that relearns the cluster off the calls' way (module docstring)."""

    _relearning: asyncio.Task[None] | None = None
    _relearnt_at = float("-inf")

    async def initialize(self, *args: Any, **kwargs: Any) -> ClusterClient:
        """Learn the cluster on first use (every call waits for that); after that, a client
        marked stale by a failure goes on with the map it has, and relearns it in the
        background."""
        if not self._initialize:
            return self
        if not self.nodes_manager.slots_cache:
            await super().initialize(*args, **kwargs)
            self._relearnt_at = time.monotonic()
            return self
        self._initialize = False
        if self._relearning is None or self._relearning.done():
            self._relearning = asyncio.get_running_loop().create_task(self._relearn())
        return self

    async def _relearn(self) -> None:
        wait = self._relearnt_at + RELEARN_SECONDS - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        try:
            await self.nodes_manager.initialize()
        except Exception as exc:  # no node answered: the next failure asks again
            log.debug("relearning the Redis Cluster's slots failed: %s", exc)
        finally:
            self._relearnt_at = time.monotonic()

    async def aclose(self) -> None:
        """What redis-py calls after a CLUSTERDOWN or an uncovered slot, to relearn the
        cluster: only marks the map stale here (closing every node's connections cut the
        calls under way on the healthy masters). `close_for_good` closes the client."""
        self._initialize = True

    async def close_for_good(self) -> None:
        """Close the client for good: the relearning under way, then every connection."""
        relearning, self._relearning = self._relearning, None
        if relearning is not None:
            relearning.cancel()
            await asyncio.gather(relearning, return_exceptions=True)
        self._initialize = True  # what redis-py reads as closed
        # The startup nodes' connections are closed even when closing the others failed
        # (redis-py raises its TimeoutError when a connection is slow to close).
        try:
            await self.nodes_manager.aclose()
        finally:
            await self.nodes_manager.aclose("startup_nodes")
