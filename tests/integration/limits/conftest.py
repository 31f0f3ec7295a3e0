"""The limiters' tests share their storages (tests.support.limiter_backends) and subjects: a
limiter on each backend, and subjects unique per test.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.limits import Limiter
from tests.support.limiter_backends import Backend, redis_backend_of


@pytest.fixture(params=["memory", "redis", "cluster", "sentinel"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "memory":
        return Backend("memory", "memory://")
    return redis_backend_of(request, request.param)


@pytest.fixture(params=["redis", "cluster", "sentinel"])
def redis_backend(request: pytest.FixtureRequest) -> Backend:
    return redis_backend_of(request, request.param)


@pytest.fixture
async def limiter(backend: Backend) -> AsyncIterator[Limiter]:
    limiter = backend.limiter()
    yield limiter
    await limiter.close()


@pytest.fixture
def new_subject() -> Callable[[], str]:
    """Subjects shaped like the real ones ("<key name>:<product>") and unique per call."""

    def make() -> str:
        return f"key-{uuid.uuid4().hex[:12]}.test:product-a"

    return make


@pytest.fixture
def subject(new_subject: Callable[[], str]) -> str:
    return new_subject()
