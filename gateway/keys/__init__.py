"""Keys as data: API keys made through the admin API, kept in the limit storage, and served
from memory by every gateway process (`KeyStore` follows the storage, `KeyIndex` answers the
request path).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.config.model import StorageConfig
from gateway.keys.index import KeyIndex, Principal
from gateway.keys.records import KeyRecord
from gateway.keys.store import KeyStore
from gateway.keys.table import ApiKeyTable

if TYPE_CHECKING:
    from gateway.limits.redis_clients import StorageRedis

__all__ = ["ApiKeyTable", "KeyIndex", "KeyRecord", "KeyStore", "Principal", "create_key_store"]


def create_key_store(
    storage: StorageConfig,
    on_storage_error: Callable[[str], None] | None = None,
    redis: StorageRedis | None = None,
) -> KeyStore:
    """The key store for `storage.url`; like the limiter, it connects on first use, and
    `on_storage_error(operation)` counts the storage's failures."""
    if storage.is_memory:
        from gateway.keys.backend import MemoryKeyBackend

        return KeyStore(MemoryKeyBackend())
    from gateway.keys.redis import RedisKeyBackend

    backend = RedisKeyBackend.from_url(storage.url, storage.timeout, on_storage_error, redis)
    return KeyStore(backend)
