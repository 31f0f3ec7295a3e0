"""Shared pytest fixtures."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import uvloop

from tests.support.redis_servers import RedisClusterNodes, RedisSentinelGroup, RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server shared by the whole session; tests use their own keys."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    """A 3-master Redis Cluster shared by the whole session; `.url` is redis+cluster://."""
    cluster = RedisClusterNodes(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinelGroup]:
    """A master, a replica and two Sentinels shared by the session (never failed over);
    `.url` is redis+sentinel://."""
    group = RedisSentinelGroup(tmp_path_factory.mktemp("redis-sentinel"))
    group.start()
    yield group
    group.stop()


@pytest.fixture
def fresh_redis_sentinel(tmp_path: Path) -> Iterator[RedisSentinelGroup]:
    """A Sentinel group of this test alone, for tests that fail the master over."""
    group = RedisSentinelGroup(tmp_path / "sentinel")
    group.start()
    yield group
    group.stop()


@pytest.fixture
def fresh_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, for tests that kill, freeze or restart it."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """In-process gateways run on uvloop, as `gateway run` does: its transports differ."""
    return {"uvloop": LeakCheckingLoop}


class LeakCheckingLoop(uvloop.Loop):
    """uvloop warns of each handle a test left open before closing it, at the loop's close.
    With warnings as errors the warning raised inside its C callback, the handle was never
    closed, and `loop.close()` waited on its socket for good: one leaked connection hung the
    whole run until pytest-timeout ended it. Here the handles are closed and the test fails."""

    def close(self) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            super().close()
        leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        if leaked:
            raise AssertionError(f"left open when the test's event loop closed: {leaked}")
