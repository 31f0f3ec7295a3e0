"""The status tests' rig (tests/integration/test_statuses*.py): a recording upstream, a
gateway Worker serving tests.support.statuses.API in front of it, and a client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.server import Worker
from tests.support.config import worker_server_yaml, write_config
from tests.support.gateway import running_gateway
from tests.support.sockets import closed_port
from tests.support.statuses import API
from tests.support.upstream import Upstream, running_upstream


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with running_upstream() as server:
        yield server


@pytest.fixture
async def gateway(tmp_path: Path, upstream: Upstream) -> AsyncIterator[Worker]:
    config = write_config(
        tmp_path / "config",
        API.format(upstream=upstream.url, closed_port=closed_port()),
        server=worker_server_yaml(client_header="300ms", client_body="300ms"),
    )
    async with running_gateway(config) as worker:
        yield worker


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
