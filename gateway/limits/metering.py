"""What happens to an admission after the upstream has answered, and the limit a process keeps
on its own while the storage is away (README "Metering").

Refunds run as tasks of their own, after the request's outcome is known: a request whose
client went away is being cancelled and can no longer await anything. Each refund is tried
once: a storage call whose reply was lost may still have been applied, and trying it again
could give the units back twice, so it is logged and counted instead. (One that timed out was
not: the storage gives nothing back after the refund's deadline.)
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Literal

from gateway.config.model import RateRule
from gateway.limits.base import Limiter, Receipt, StorageError

log = logging.getLogger(__name__)

# Told (product, plan, result, units) once per refund.
RefundCounter = Callable[[str, str, Literal["ok", "error"], int], None]

_PARTS = 1_000_000
# How many storage timeouts a refund may take before `Refunds` gives up on it.
_BACKSTOP = 2


# Rules come from the config, so few distinct ones: this bound only matters across reloads.
@functools.lru_cache(maxsize=1024)
def local_rate(rate: RateRule, fraction: float) -> RateRule:
    """The share of `rate` one process admits on its own: ceil(limit * fraction), at least 1.

    Asked on every request while the storage is away, so each share is made once (rules are
    frozen). Whole-number arithmetic, so that 10 * 0.3 is 3 and not the 4 that float
    rounding gives."""
    parts = round(fraction * _PARTS)
    limit = max(1, -(-rate.limit * parts // _PARTS))
    return RateRule(limit, rate.window, rate.per)


class Refunds:
    """The refunds under way in one worker; `drain` waits for them before the storage closes."""

    def __init__(self, count: RefundCounter) -> None:
        self._count = count
        self._running: set[asyncio.Task[None]] = set()

    def start(
        self, limiter: Limiter, subject: str, receipt: Receipt, product: str, within: float
    ) -> None:
        task = asyncio.get_running_loop().create_task(
            self._refund(limiter, subject, receipt, product, within)
        )
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _refund(
        self, limiter: Limiter, subject: str, receipt: Receipt, product: str, within: float
    ) -> None:
        try:
            # The storage bounds the call by `within` itself and counts a miss as a storage
            # error (gateway_storage_errors_total{operation="refund"}); this later deadline
            # only keeps `drain` from waiting on a storage that would not.
            async with asyncio.timeout(within * _BACKSTOP):
                await limiter.refund(subject, receipt)
        except (StorageError, TimeoutError) as exc:
            log.warning(
                "could not give back %d units of %s (%s); not retried, so never twice",
                receipt.cost,
                subject,
                str(exc) or "timed out",  # a TimeoutError says nothing of itself
            )
            self._count(product, receipt.plan, "error", receipt.cost)
            return
        self._count(product, receipt.plan, "ok", receipt.cost)

    async def drain(self) -> None:
        while self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)
