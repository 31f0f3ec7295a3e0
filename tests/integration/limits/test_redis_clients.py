"""The guard every storage call runs under (gateway/limits/redis_clients.py), on a real Redis."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.limits.base import StorageError
from gateway.limits.redis_clients import StorageGuard, open_storage_redis
from tests.support.redis_servers import RedisServer

TIMEOUT = 0.25
MARGIN = 0.25


async def test_a_call_that_cleans_up_slowly_is_left_behind_at_the_timeout(
    fresh_redis_server: RedisServer,
) -> None:
    """A client may clean up after a failure for long (redis-py's cluster client closes every
    node's connections and pauses before giving up): the caller does not wait for that."""
    storage = open_storage_redis(fresh_redis_server.url, TIMEOUT)
    guard = StorageGuard(storage.client, TIMEOUT, "limit storage")
    cleaned_up = asyncio.Event()

    async def ping_then_clean_up_slowly() -> object:
        try:
            return await storage.client.ping()
        except BaseException:
            await asyncio.sleep(4 * TIMEOUT)  # what the client's clean-up takes
            cleaned_up.set()
            raise

    try:
        assert await guard("ping", ping_then_clean_up_slowly)  # answered: no clean-up wait
        fresh_redis_server.pause()
        started = time.monotonic()
        with pytest.raises(StorageError, match="timed out"):
            await guard("ping", ping_then_clean_up_slowly)
        assert time.monotonic() - started < TIMEOUT + MARGIN
        assert not cleaned_up.is_set()  # still cleaning up, on its own
        await asyncio.wait_for(cleaned_up.wait(), 8 * TIMEOUT)
    finally:
        fresh_redis_server.resume()
        await storage.aclose()
