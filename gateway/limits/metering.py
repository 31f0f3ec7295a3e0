"""What happens to an admission after the upstream has answered, and the limit a process keeps
on its own while the storage is away (README "Metering").

Refunds and charges (README "Metering": refund_on, and a cost the upstream reports) run as
tasks of their own, after the request's outcome is known: a request whose client went away is
being cancelled and can no longer await anything. Each is tried once: a storage call whose
reply was lost may still have been applied, and trying it again could move the units twice, so
it is logged and counted instead. (One that timed out was not: the storage moves nothing after
the call's deadline.)
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from gateway.config.model import RateRule
from gateway.limits.base import Limiter, Receipt, StorageError

log = logging.getLogger(__name__)

# Told (product, plan, result, units) once per refund, or once per charge.
SettleCounter = Callable[[str, str, Literal["ok", "error"], int], None]

_PARTS = 1_000_000
# How many storage timeouts a refund or charge may take before `Settlements` gives up on it.
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


class Settlements:
    """The refunds and charges under way in one worker, each in a task of its own; `drain`
    waits for them before the storage closes."""

    def __init__(self, count_refund: SettleCounter, count_charge: SettleCounter) -> None:
        self._count_refund = count_refund
        self._count_charge = count_charge
        self._running: set[asyncio.Task[None]] = set()

    def start(
        self,
        limiter: Limiter,
        subject: str,
        receipt: Receipt,
        product: str,
        within: float,
        change: int,
        request_id: str = "",
    ) -> None:
        """Settle an admission in a task: `change` below 0 gives back that many of its units
        (all of them: `-receipt.cost`), above 0 takes that many more. `request_id` names its
        request in the warning of a settlement that fails."""
        if change < 0:
            units, verb, count = -change, "give back", self._count_refund
            given = receipt if units == receipt.cost else receipt._replace(cost=units)
            call = limiter.refund(subject, given)
        else:
            units, verb, count = change, "take", self._count_charge
            call = limiter.charge(subject, receipt, units)
        task = asyncio.get_running_loop().create_task(
            self._settle(
                call, verb, units, subject, product, receipt.plan, within, count, request_id
            )
        )
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _settle(
        self,
        call: Coroutine[Any, Any, int],
        verb: str,
        units: int,
        subject: str,
        product: str,
        plan: str,
        within: float,
        count: SettleCounter,
        request_id: str,
    ) -> None:
        try:
            # The storage bounds the call by `within` itself and counts a miss as a storage
            # error (gateway_storage_errors_total{operation="refund"} or "charge"); this later
            # deadline only keeps `drain` from waiting on a storage that would not.
            async with asyncio.timeout(within * _BACKSTOP):
                await call
        except (StorageError, TimeoutError) as exc:
            log.warning(
                "could not %s %d units of %s (%s); not retried, so never twice (request %s)",
                verb,
                units,
                subject,
                str(exc) or "timed out",  # a TimeoutError says nothing of itself
                request_id or "unknown",
            )
            count(product, plan, "error", units)
            return
        count(product, plan, "ok", units)

    async def drain(self) -> None:
        while self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)
