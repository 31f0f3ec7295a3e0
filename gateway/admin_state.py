"""What every admin endpoint works with: the worker's `AdminState`, and the one way an admin
call waits for the storage (`within_storage_timeout`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web

from gateway.config.model import Config
from gateway.keys.api import KeysAccess
from gateway.limits.base import Limiter, StorageError
from gateway.problems import StorageUnavailable

_T = TypeVar("_T")
log = logging.getLogger("gateway.admin")

ConfigGetter = Callable[[], Config]  # the config the worker serves right now
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class AdminState:
    get_config: ConfigGetter
    limiter: Limiter
    token: bytes | None
    clock: Clock
    keys: KeysAccess | None  # None: no keys API (the usage API serves the file's keys)
    draining: Callable[[], bool]  # the process is stopping: not ready for new traffic


ADMIN_STATE = web.AppKey("admin_state", AdminState)


# The limiter bounds each of its storage calls by storage.timeout and counts those that fail
# (gateway_storage_errors_total); the admin's own bound is a backstop behind it. The same
# bound would cut in first (its timer is older) and leave timeouts uncounted.
_BACKSTOP_SLACK = 0.1


async def within_storage_timeout(state: AdminState, call: Awaitable[_T]) -> _T:
    try:
        async with asyncio.timeout(state.get_config().storage.timeout + _BACKSTOP_SLACK):
            return await call
    except (StorageError, TimeoutError) as exc:
        # The 503 says only "try again"; what the storage said is for the operator.
        log.warning("admin API: %s", str(exc) or "the storage did not answer in time")
        raise StorageUnavailable() from exc
