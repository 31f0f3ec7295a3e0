"""Keys as data: API keys made through the admin API, kept in the limit storage, and served
from memory by every gateway process (`KeyStore` follows the storage, `KeyIndex` answers the
request path).
"""

from __future__ import annotations

from gateway.config.model import StorageConfig
from gateway.keys.index import KeyIndex, Principal
from gateway.keys.records import KeyRecord
from gateway.keys.store import KeyStore
from gateway.keys.table import ApiKeyTable

__all__ = ["ApiKeyTable", "KeyIndex", "KeyRecord", "KeyStore", "Principal", "create_key_store"]


def create_key_store(storage: StorageConfig) -> KeyStore:
    """The key store for `storage.url`; like the limiter, it connects on first use."""
    if storage.is_memory:
        from gateway.keys.backend import MemoryKeyBackend

        return KeyStore(MemoryKeyBackend(), storage.timeout)
    from gateway.keys.redis import RedisKeyBackend

    return KeyStore(RedisKeyBackend.from_url(storage.url, storage.timeout), storage.timeout)
