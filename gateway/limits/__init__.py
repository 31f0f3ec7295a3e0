"""Limit storages: the rate and quota of each subscription, checked and consumed atomically.

`create_limiter` picks the storage from `storage.url`; the request path only sees the
`Limiter` protocol of `gateway.limits.base`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.config.model import StorageConfig
from gateway.limits.base import Decision, Limiter, QuotaUsage, StorageError, WindowState

if TYPE_CHECKING:
    from gateway.limits.redis_clients import StorageRedis

__all__ = [
    "Decision",
    "Limiter",
    "QuotaUsage",
    "StorageError",
    "WindowState",
    "create_limiter",
]


def create_limiter(
    storage: StorageConfig,
    on_storage_error: Callable[[str], None] | None = None,
    redis: StorageRedis | None = None,
) -> Limiter:
    """The limiter for `storage.url`; `on_storage_error(operation)` counts storage failures.

    Creating it does not connect: a Redis that is down shows up as StorageError on use.
    """
    if storage.is_memory:
        from gateway.limits.memory import MemoryLimiter

        return MemoryLimiter()
    # Imported here so that a memory-only gateway never loads the Redis client.
    from gateway.limits.redis import RedisLimiter

    return RedisLimiter.from_config(storage, on_storage_error, redis)
