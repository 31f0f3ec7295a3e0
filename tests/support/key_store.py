"""Key stores on a test's own Redis, standing for gateway processes that share it, and the
waits and records their tests repeat."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

from gateway.config.model import StorageConfig
from gateway.keys import KeyRecord, KeyStore, create_key_store

# What the contract promises: a change is honoured by every process within this.
HONOURED_WITHIN = 1.0


@asynccontextmanager
async def started_store(url: str) -> AsyncIterator[KeyStore]:
    store = create_key_store(StorageConfig(url=url, timeout=1.0))
    await store.start()
    try:
        yield store
    finally:
        await store.close()


def record(name: str, digest: str | None = None, **fields: object) -> KeyRecord:
    now = time.time()
    digest = digest or uuid.uuid4().hex * 2
    return replace(KeyRecord(name, digest, {"soccer": "trial"}, created=now, updated=now), **fields)


async def until(condition: Callable[[], bool], within: float, what: str) -> float:
    """Seconds until `condition` held; fails naming `what` after `within`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
