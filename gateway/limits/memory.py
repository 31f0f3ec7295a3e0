"""The embedded limit storage: exact, in one process, for `storage.url: memory://`.

Every method runs without awaiting anything, so on one event loop a check-and-consume is
atomic by construction. The rate is a sliding log of admission times; the quota a counter
per calendar period. Subjects whose state has expired are swept from time to time so the
memory stays bounded by the subjects that are active.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.config.model import QuotaRule, RateRule
from gateway.limits.base import Decision, Outcome, QuotaUsage, WindowState, make_decision
from gateway.limits.periods import PeriodCache

_new_tuple = tuple.__new__


@dataclass(slots=True)
class _RateLog:
    window: float
    admitted: deque[float] = field(default_factory=deque)  # oldest first

    def forget_before(self, now: float) -> None:
        horizon = now - self.window
        admitted = self.admitted
        while admitted and admitted[0] <= horizon:
            admitted.popleft()


@dataclass(slots=True)
class _QuotaCount:
    start: float
    end: float
    used: int = 0


class MemoryLimiter:
    """A `Limiter` kept in this process's memory; not shared between workers."""

    def __init__(
        self, clock: Callable[[], float] = time.time, sweep_interval: float = 60.0
    ) -> None:
        self._clock = clock
        self._sweep_interval = sweep_interval
        self._next_sweep = clock() + sweep_interval
        self._rates: dict[str, _RateLog] = {}
        self._quotas: dict[str, _QuotaCount] = {}
        self._periods = PeriodCache()

    async def hit(self, subject: str, rate: RateRule | None, quota: QuotaRule | None) -> Decision:
        # The request path's hottest storage call: written out in one function, with the
        # results built by tuple.__new__ (see base.py), it costs a third of the plain version.
        now = self._clock()
        if now >= self._next_sweep:
            self.sweep(now)

        admitted: deque[float] | None = None
        if rate is not None:
            log = self._rates.get(subject)
            if log is None:
                log = self._rates[subject] = _RateLog(rate.window)
            else:
                log.window = rate.window  # a reload may have changed it
            admitted = log.admitted
            if admitted and admitted[0] <= now - rate.window:
                log.forget_before(now)
        counter: _QuotaCount | None = None
        if quota is not None:
            start, end = self._periods.period(now, quota.per, quota.timezone)
            counter = self._quotas.get(subject)
            if counter is None or counter.start != start:
                counter = self._quotas[subject] = _QuotaCount(start, end)

        outcome: Outcome = "allowed"
        if counter is not None and quota is not None and counter.used >= quota.limit:
            outcome = "quota_exceeded"
        elif admitted is not None and rate is not None and len(admitted) >= rate.limit:
            outcome = "throttled"
        else:
            if counter is not None:
                counter.used += 1
            if admitted is not None:
                admitted.append(now)

        rate_state = None
        if admitted is not None and rate is not None:
            limit = rate.limit
            count = len(admitted)
            if count == 0:
                reset = 0.0
            else:
                # The entry whose departure leaves limit-1 behind; after a reload lowered
                # the limit the log can hold more than `limit` entries.
                reset = admitted[count - limit if count > limit else 0] + rate.window - now
            rate_state = _new_tuple(
                WindowState, (limit, limit - count if count < limit else 0, reset, rate.window)
            )
        quota_state = None
        if counter is not None and quota is not None:
            limit = quota.limit
            used = counter.used
            quota_state = _new_tuple(
                WindowState,
                (
                    limit,
                    limit - used if used < limit else 0,
                    counter.end - now,
                    counter.end - counter.start,
                ),
            )

        if outcome == "allowed":
            return _new_tuple(Decision, (outcome, rate_state, quota_state, 0.0))
        return make_decision(outcome, rate_state, quota_state)

    async def usage(self, subject: str, quota: QuotaRule) -> QuotaUsage:
        start, end = self._periods.period(self._clock(), quota.per, quota.timezone)
        counter = self._quotas.get(subject)
        used = counter.used if counter is not None and counter.start == start else 0
        return QuotaUsage(
            limit=quota.limit, used=used, remaining=max(0, quota.limit - used), reset_at=end
        )

    async def reset_quota(self, subject: str, quota: QuotaRule) -> None:
        self._quotas.pop(subject, None)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._rates.clear()
        self._quotas.clear()

    def sweep(self, now: float) -> None:
        """Drop every subject whose rate window and quota period are over."""
        self._next_sweep = now + self._sweep_interval
        for subject in [s for s, log in self._rates.items() if _rate_log_expired(log, now)]:
            del self._rates[subject]
        for subject in [s for s, count in self._quotas.items() if count.end <= now]:
            del self._quotas[subject]

    @property
    def tracked_subjects(self) -> int:
        """How many subjects hold state; for tests and debugging."""
        return len(self._rates.keys() | self._quotas.keys())


def _rate_log_expired(log: _RateLog, now: float) -> bool:
    return not log.admitted or log.admitted[-1] <= now - log.window
