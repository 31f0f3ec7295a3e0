"""API keys and Python's cyclic collector: a gateway worker's full read of the keys, and the
keys it follows change by change, are left out of later full collections, which walked every
key's objects on the event loop (80-160 ms each with 100,000 keys, during the read and after
it, until the next reload; up to 557 ms while 100,000 were created through the admin API)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config.model import StorageConfig
from gateway.keys import KeyRecord, KeyStore, create_key_store
from gateway.keys.redis import EPOCH_KEY, RECORDS_KEY, VERSION_KEY
from gateway.keys.store import _FREEZE_SLICE
from tests.support.config import server_yaml, write_config
from tests.support.key_store import HONOURED_WITHIN, until
from tests.support.processes import GatewayProcess
from tests.support.redis_servers import RedisServer
from tests.support.sockets import free_ports

# More than one slice: frozen part-way through the read, and the rest at its end.
KEYS = _FREEZE_SLICE + _FREEZE_SLICE // 2
WRITES_AT_ONCE = 20


class _Cycle:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.itself = self


async def create_keys(writer: KeyStore) -> None:
    """KEYS API keys, WRITES_AT_ONCE at a time."""
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
        await create_keys(writer)
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


# Installed in a gateway process (as `sitecustomize`, through PYTHONPATH): at the start of each
# full collection, how many API key records it is about to walk, one line each.
_COUNT_WALKED_RECORDS = """\
import gc, os

def _count(phase, info):
    if phase == "start" and info["generation"] == 2:
        walked = sum(type(thing).__name__ == "KeyRecord" for thing in gc.get_objects())
        with open(os.environ["WALKED_RECORDS_IN"], "a") as out:
            out.write(f"{walked}\\n")

gc.callbacks.append(_count)
"""
# Enough keys for the collector to start full collections of its own during a read left to it
# (100,000 keys: four, of 30-87 ms, before the worker served).
STARTING_KEYS = 30_000


def test_a_workers_first_read_at_its_start_leaves_its_keys_out_as_it_goes(
    fresh_redis_server: RedisServer, tmp_path: Path
) -> None:
    """The read a worker makes before it serves freezes the keys every 5,000 records as later
    reads do: left to the collector until the worker's freeze after its start, full
    collections walked the keys read so far (four of 30-87 ms with 100,000 keys)."""
    now = time.time()
    with contextlib.closing(fresh_redis_server.client()) as admin:
        writes = admin.pipeline(transaction=False)
        for index in range(STARTING_KEYS):
            name = f"customer-{index:06d}"
            made = KeyRecord(name, uuid.uuid4().hex * 2, {"shop": "open"}, created=now, updated=now)
            writes.hset(RECORDS_KEY, name, made.to_json())
        writes.set(VERSION_KEY, 1).set(EPOCH_KEY, "written-by-the-test")
        writes.execute()
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_COUNT_WALKED_RECORDS)
    walked_in = tmp_path / "walked-records"
    proxy_port, admin_port = free_ports(2)
    config = write_config(
        tmp_path / "config",
        "products:\n  shop:\n    upstream: {url: 'http://127.0.0.1:9'}\n"
        "    routes:\n      - path: /shop/{rest:path}\n"
        "plans:\n  open: {rate: {limit: 100000, per: second}}\n",
        server=server_yaml(proxy_port, admin_port, fresh_redis_server.url),
    )
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    gateway = GatewayProcess(config, env={"PYTHONPATH": path, "WALKED_RECORDS_IN": str(walked_in)})
    try:
        gateway.start(proxy_port, admin_port, timeout=60)
        assert "30000 loaded" in gateway.stderr()
    finally:
        assert gateway.stop() == 0, gateway.stderr()
        gateway.close()
    walked = [int(line) for line in walked_in.read_text().split()]
    # Each walks what was read since the last freeze: about a slice (a scan's batch is about
    # _LOAD_BATCH records, at Redis's discretion), not everything read so far.
    assert max(walked) <= 2 * _FREEZE_SLICE, walked
    assert len(walked) >= STARTING_KEYS // _FREEZE_SLICE, walked  # the freezes' own


@pytest.mark.usefixtures("collector_unfrozen_after")
async def test_keys_followed_change_by_change_are_left_out_of_full_collections_too(
    fresh_redis_server: RedisServer,
) -> None:
    """Keys created through the API reach every worker as announced changes, not as a full
    read: none of them was frozen, so each full collection walked every key made since the
    last read (an audit creating 100,000 keys: pauses of 250-557 ms on the event loop from
    about 50,000 on, and admin writes answered 503 meanwhile). They are frozen a slice at a
    time as they are applied: what a full collection still walks is less than a slice."""
    storage = StorageConfig(url=fresh_redis_server.url, timeout=1.0)
    follower = create_key_store(storage)
    follower.freeze_reads = True  # as a gateway worker's
    await follower.start()  # an empty store: every key below comes as a change
    writer = create_key_store(storage)
    await writer.start()
    try:
        await create_keys(writer)
        await until(lambda: len(follower.table) == KEYS, HONOURED_WITHIN, "every key followed")
        walked = {id(thing) for thing in gc.get_objects()}  # what a full collection walks
        walked_still = sum(id(record) in walked for record in follower.table.records.values())
        assert walked_still < _FREEZE_SLICE, f"{walked_still} of {KEYS} records"
    finally:
        await writer.close()
        await follower.close()
