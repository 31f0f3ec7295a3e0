"""The keys API tests run on one rig (tests.support.keys_api_rig): a gateway on memory://; the
key store's, on each kind of Redis (`storage_url`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.config import worker_server_yaml, write_config
from tests.support.gateway import running_gateway
from tests.support.keys_api_rig import API, Rig
from tests.support.redis_servers import RedisClusterNodes, RedisSentinelGroup, RedisServer
from tests.support.upstream import running_upstream


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with running_upstream() as upstream:
        config = write_config(
            tmp_path / "config", API.format(upstream=upstream.url), server=worker_server_yaml()
        )
        async with running_gateway(config) as worker, aiohttp.ClientSession() as session:
            yield Rig(worker, session)


@pytest.fixture(params=["redis", "cluster", "sentinel"])
def storage_url(request: pytest.FixtureRequest) -> str:
    fixture = {"redis": "redis_server", "cluster": "redis_cluster"}.get(
        request.param, "redis_sentinel"
    )
    server: RedisServer | RedisClusterNodes | RedisSentinelGroup = request.getfixturevalue(fixture)
    return server.url


@pytest.fixture(params=["memory", "redis"])
async def any_rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    """A rig on memory://, or on the session's redis-server (whose write.lua keeps the
    secrets' owners)."""
    storage = "memory://"
    if request.param == "redis":
        storage = request.getfixturevalue("redis_server").url
    async with running_upstream() as upstream:
        config = write_config(
            tmp_path / "config",
            API.format(upstream=upstream.url),
            server=worker_server_yaml(storage_url=storage),
        )
        async with running_gateway(config) as worker, aiohttp.ClientSession() as session:
            yield Rig(worker, session)
