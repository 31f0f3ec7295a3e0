"""The key store on real Redis, Redis Cluster and Sentinel: two stores stand for two gateway
processes sharing the storage; what one writes, the other serves from memory within a second,
and concurrent writes of one key lose nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace

import pytest

from gateway.keys import KeyRecord
from gateway.keys.backend import WriteRefused
from gateway.keys.records import PreviousSecret
from tests.support.key_store import HONOURED_WITHIN, record, started_store, unique, until


async def test_every_change_reaches_the_other_process_within_a_second(storage_url: str) -> None:
    async with started_store(storage_url) as writer, started_store(storage_url) as follower:
        assert follower.table.loaded
        name = unique("acme")
        created = await writer.create(record(name))
        assert writer.table.secret(created.key_sha256) is not None  # its own write: at once
        await until(
            lambda: follower.table.secret(created.key_sha256) is not None,
            HONOURED_WITHIN,
            "created key known to the follower",
        )

        await writer.update(name, lambda current: replace(current, disabled=True))
        await until(
            lambda: follower.table.records[name].disabled, HONOURED_WITHIN, "disable followed"
        )

        until_at = time.time() + 3600
        await writer.update(
            name,
            lambda current: replace(
                current,
                key_sha256="f" * 64,
                previous=(PreviousSecret(current.key_sha256, until_at),),
            ),
        )
        await until(
            lambda: follower.table.secret("f" * 64) is not None, HONOURED_WITHIN, "rotation"
        )
        old = follower.table.secret(created.key_sha256)
        new = follower.table.secret("f" * 64)
        assert old is not None and new is not None
        assert old[0] is new[0] and old[1] == until_at and new[1] is None  # one key, two secrets

        await writer.delete(name)
        await until(lambda: name not in follower.table.records, HONOURED_WITHIN, "delete")
        assert follower.table.secret("f" * 64) is None
        assert follower.table.secret(created.key_sha256) is None
        assert follower.known_version == writer.known_version


async def test_a_restarted_process_loads_every_key(storage_url: str) -> None:
    names = [unique("kept") for _ in range(3)]
    async with started_store(storage_url) as writer:
        for name in names:
            await writer.create(record(name))
        await writer.delete(names[2])
    async with started_store(storage_url) as restarted:
        assert restarted.table.loaded
        assert names[0] in restarted.table.records and names[1] in restarted.table.records
        assert names[2] not in restarted.table.records


async def test_names_and_secrets_are_unique_in_the_storage(storage_url: str) -> None:
    async with started_store(storage_url) as one, started_store(storage_url) as other:
        name = unique("taken")
        first = await one.create(record(name))
        with pytest.raises(WriteRefused) as refused:
            await other.create(record(name))
        assert refused.value.reason == "name_taken"
        with pytest.raises(WriteRefused) as refused:
            await other.create(record(unique("copy"), first.key_sha256))
        assert refused.value.reason == "secret_taken"
        with pytest.raises(WriteRefused) as refused:
            await other.update(unique("ghost"), lambda current: current)
        assert refused.value.reason == "not_found"
        # Once deleted, its secret may be used again.
        await one.delete(name)
        await other.create(record(unique("reuse"), first.key_sha256))


async def test_concurrent_changes_of_one_key_are_both_kept(storage_url: str) -> None:
    async with started_store(storage_url) as one, started_store(storage_url) as other:
        name = unique("busy")
        await one.create(record(name))
        await asyncio.gather(
            one.update(name, lambda current: replace(current, disabled=True)),
            other.update(name, lambda current: replace(current, plans={"weather": "pro"})),
            one.update(name, lambda current: replace(current, expires=4102444800.0)),
        )
        final = await one.read(name)
        assert final is not None
        assert (final.disabled, dict(final.plans), final.expires) == (
            True,
            {"weather": "pro"},
            4102444800.0,
        )


async def test_a_busy_key_is_never_a_storage_failure_and_loses_no_change(
    storage_url: str,
) -> None:
    """Many writers of one key, in three processes: each change is kept or refused as
    "changed" (409), never a storage failure (503, which would send the operator looking at
    Redis), and none is lost."""
    async with (
        started_store(storage_url) as one,
        started_store(storage_url) as two,
        started_store(storage_url) as three,
    ):
        name = unique("busy")
        await one.create(record(name, plans={}))

        def adding(plan: str) -> Callable[[KeyRecord], KeyRecord]:
            return lambda current: replace(current, plans={**current.plans, plan: "trial"})

        stores = (one, two, three) * 5
        outcomes = await asyncio.gather(
            *(store.update(name, adding(f"p{i}")) for i, store in enumerate(stores)),
            return_exceptions=True,
        )
        refused = [o for o in outcomes if isinstance(o, BaseException)]
        assert all(isinstance(o, WriteRefused) and o.reason == "changed" for o in refused)
        final = await one.read(name)
        assert final is not None
        kept = {f"p{i}" for i, o in enumerate(outcomes) if not isinstance(o, BaseException)}
        assert set(final.plans) == kept


async def test_the_writes_of_one_key_in_one_process_take_turns(storage_url: str) -> None:
    """Within one process nothing needs to race: 60 concurrent changes of one key are all
    made (30 admin PATCHes at once got a third of them refused 409 on Redis)."""
    async with started_store(storage_url) as one:
        name = unique("turns")
        await one.create(record(name, plans={}))

        def adding(plan: str) -> Callable[[KeyRecord], KeyRecord]:
            return lambda current: replace(current, plans={**current.plans, plan: "trial"})

        await asyncio.gather(*(one.update(name, adding(f"p{i}")) for i in range(60)))
        final = await one.read(name)
        assert final is not None
        assert set(final.plans) == {f"p{i}" for i in range(60)}
        assert not one._turns  # nothing kept for keys no longer being written
