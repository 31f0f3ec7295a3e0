"""`finish_within`: a closing step that fails or hangs is one warning line, never a traceback.

A worker's drain runs each closing step through it; redis-py raises its own TimeoutError (no
builtin one) when a connection is slow to close, which used to end the drain with exit 1.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.tasks import finish_within


async def _fail(exc: Exception) -> None:
    await asyncio.sleep(0)
    raise exc


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gateway" and r.levelno == logging.WARNING]


async def test_a_step_that_fails_is_named_with_why(caplog: pytest.LogCaptureFixture) -> None:
    failure = RedisTimeoutError("Timed out closing connection after 0.25")
    assert not await finish_within(_fail(failure), 1.0, "closing the storage client")
    [warning] = _warnings(caplog)
    assert warning.getMessage() == (
        "closing the storage client failed (TimeoutError: Timed out closing connection after "
        "0.25); going on without it"
    )
    assert warning.exc_info is None  # one line, no traceback


async def test_a_builtin_timeout_of_the_step_is_a_failure_not_the_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert not await finish_within(_fail(TimeoutError()), 1.0, "a step")
    assert [w.getMessage() for w in _warnings(caplog)] == [
        "a step failed (TimeoutError); going on without it"
    ]


async def test_a_step_that_hangs_is_left_behind_at_the_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert not await finish_within(asyncio.sleep(5), 0.1, "a slow step")
    assert [w.getMessage() for w in _warnings(caplog)] == [
        "a slow step did not finish within 0.1s; going on without it"
    ]


async def test_without_a_bound_a_step_that_finishes_says_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert await finish_within(asyncio.sleep(0), None, "a step")
    assert _warnings(caplog) == []
