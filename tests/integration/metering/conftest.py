"""The metering tests run on one rig (tests.support.metering_rig) for each storage: memory,
a real redis-server and a real Redis Cluster.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.metering_rig import Rig, _running_rig


@pytest.fixture(params=["memory", "redis", "cluster"])
async def rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    url = "memory://"
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url
    elif request.param == "cluster":
        url = request.getfixturevalue("redis_cluster").url
    # A generous storage timeout: the first calls to a cluster open a connection each.
    async with _running_rig(tmp_path, storage_url=url, storage_timeout="2s") as rig:
        yield rig
