"""API keys and Python's cyclic collector: a gateway worker's full read of the keys leaves
them out of later full collections, which walked every key's objects on the event loop
(80-160 ms each with 100,000 keys, during the read and after it, until the next reload)."""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
import weakref
from collections.abc import Iterator

import pytest

from gateway.config.model import StorageConfig
from gateway.keys import KeyRecord, create_key_store
from gateway.keys.store import _FREEZE_SLICE
from tests.support.redis_servers import RedisServer

# More than one slice: frozen part-way through the read, and the rest at its end.
KEYS = _FREEZE_SLICE + _FREEZE_SLICE // 2
WRITES_AT_ONCE = 20


class _Cycle:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.itself = self


@pytest.fixture
def collector_unfrozen_after() -> Iterator[None]:
    """This test process's objects frozen by the read go back to the collector."""
    try:
        yield
    finally:
        gc.unfreeze()


@pytest.mark.usefixtures("collector_unfrozen_after")
async def test_a_full_read_leaves_its_keys_out_of_full_collections(
    fresh_redis_server: RedisServer,
) -> None:
    storage = StorageConfig(url=fresh_redis_server.url, timeout=1.0)
    writer = create_key_store(storage)
    await writer.start()
    try:
        now = time.time()
        for start in range(0, KEYS, WRITES_AT_ONCE):
            await asyncio.gather(
                *(
                    writer.create(
                        KeyRecord(
                            f"customer-{index:06d}",
                            uuid.uuid4().hex * 2,
                            {"soccer": "trial"},
                            created=now,
                            updated=now,
                        )
                    )
                    for index in range(start, min(start + WRITES_AT_ONCE, KEYS))
                )
            )
    finally:
        await writer.close()

    # Cyclic garbage in the oldest generation, where only a full collection finds it: a
    # freeze must not keep it (nor the sockets such garbage can hold) for good.
    cycle = _Cycle()
    gc.collect()
    garbage = weakref.ref(cycle)
    del cycle

    follower = create_key_store(storage)
    follower.freeze_reads = True  # as a gateway worker's
    await follower.start()  # its first read is a full one
    try:
        assert len(follower.table) == KEYS
        walked = {id(thing) for thing in gc.get_objects()}  # what a full collection walks
        records = list(follower.table.records.values())
        secrets = [follower.table.secret(record.key_sha256) for record in records]
        walked_still = [
            type(thing).__name__
            for thing in (*records, *secrets, *(secret[0] for secret in secrets if secret))
            if id(thing) in walked
        ]
        assert not walked_still, f"{len(walked_still)} of the keys' objects: {walked_still[:3]}"
        gc.collect()
        assert garbage() is None, "cyclic garbage was frozen with the keys"
    finally:
        await follower.close()
