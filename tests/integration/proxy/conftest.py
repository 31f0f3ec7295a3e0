"""The proxy's tests share one rig (tests.support.forwarding): an echoing upstream, a front
server forwarding to it, and a client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.support.forwarding import Front, UpstreamState, running_echo_upstream, running_front


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamState]:
    async with running_echo_upstream() as state:
        yield state


@pytest.fixture
async def front(upstream: UpstreamState) -> AsyncIterator[Front]:
    async with running_front(upstream.port) as running:
        yield running


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
