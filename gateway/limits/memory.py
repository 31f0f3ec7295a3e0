"""The embedded limit storage: exact, in one process, for `storage.url: memory://`.

Every method runs without awaiting anything, so on one event loop a check-and-consume is
atomic by construction. The rate is a sliding log of admission times; the quota a counter
per calendar period; the history a count per subscription and UTC day. Subjects whose state
has expired are swept from time to time so the memory stays bounded by the subjects that are
active (and by the history kept).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from gateway.config.model import QuotaRule, RateRule
from gateway.limits.base import (
    CREDIT_KEY_TTL,
    DAY_SECONDS,
    HISTORY_DAYS,
    Abandoned,
    Credited,
    DayUsage,
    Decision,
    Outcome,
    QuotaUsage,
    Receipt,
    WindowState,
    day_of,
    make_decision,
    subject_order,
)
from gateway.limits.periods import PeriodCache

_new_tuple = tuple.__new__
# History days handed out per batch by `export`.
_EXPORT_BATCH = 500


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
    # Its kind of period: one of another kind may begin at the same instant (a day that begins
    # a month), and has a count of its own.
    per: str
    stamp: int  # this counter's incarnation, for refunds
    used: int = 0
    credit: int = 0


@dataclass(slots=True)
class _Day:
    stamp: int
    counts: dict[str, list[int]] = field(default_factory=dict)  # plan -> [requests, units]


class MemoryLimiter:
    """A `Limiter` kept in this process's memory; not shared between workers.

    `keep_history=False` makes a limiter that only limits (the local fallback of
    `storage.on_error: local` counts nothing).
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        sweep_interval: float = 60.0,
        keep_history: bool = True,
    ) -> None:
        self._clock = clock
        self._sweep_interval = sweep_interval
        self._next_sweep = clock() + sweep_interval
        self._keep_history = keep_history
        self._rates: dict[str, _RateLog] = {}
        self._quotas: dict[str, _QuotaCount] = {}  # each subject's counter of the period in use
        # Counters of periods that have not ended but are no longer the subject's (its quota's
        # `per` or timezone changed): kept, as the storage keeps one per period, so that going
        # back finds what was used (dropped, a month's count was forgotten by a switch to a
        # daily quota and back, and the month admitted its limit once more). By subject,
        # period start and kind.
        self._set_aside: dict[tuple[str, float, str], _QuotaCount] = {}
        self._days: dict[int, dict[str, _Day]] = {}  # day -> subject -> counts
        # The current UTC day, its end, and its subjects: the hot path's way into _days.
        self._day = -1
        self._day_end = 0.0
        self._today: dict[str, _Day] = {}
        # The earlier of the next sweep and the end of the day: one comparison per hit.
        self._next_due = 0.0
        self._periods = PeriodCache()
        self._stamps = itertools.count(1)
        # Idempotency keys of credits: (subject, key) -> (units, forgotten at), oldest first.
        self._credit_keys: dict[tuple[str, str], tuple[int, float]] = {}

    async def hit(
        self,
        subject: str,
        rate: RateRule | None,
        quota: QuotaRule | None,
        cost: int = 1,
        plan: str = "",
        abandoned: Abandoned | None = None,  # never needed: this check never waits
        settles: bool = False,
    ) -> Decision:
        # The request path's hottest storage call: written out in one function, with the
        # results built by tuple.__new__ (see base.py), it costs a third of the plain version.
        now = self._clock()
        if now >= self._next_due:
            self._due(now)

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
            if counter is None or counter.start != start or counter.per != quota.per:
                counter = self._switch(subject, counter, start, end, quota.per, now)

        outcome: Outcome = "allowed"
        receipt = None
        if (
            counter is not None
            and quota is not None
            and counter.used + cost > quota.limit + counter.credit
        ):
            outcome = "quota_exceeded"
        elif admitted is not None and rate is not None and len(admitted) >= rate.limit:
            outcome = "throttled"
        else:
            if counter is not None:
                counter.used += cost
            if admitted is not None:
                admitted.append(now)
            if self._keep_history:
                record = self._today.get(subject)
                if record is None:
                    record = self._today[subject] = _Day(next(self._stamps))
                counts = record.counts.get(plan)
                if counts is None:
                    counts = record.counts[plan] = [0, 0]
                counts[0] += 1
                counts[1] += cost
                if settles and counter is not None and quota is not None:
                    receipt = Receipt(
                        cost, plan, counter.start, counter.stamp, self._day, record.stamp, quota
                    )
                elif settles:
                    receipt = Receipt(cost, plan, 0.0, 0, self._day, record.stamp, None)

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
            limit = quota.limit + counter.credit
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
            return _new_tuple(Decision, (outcome, rate_state, quota_state, 0.0, receipt))
        return make_decision(outcome, rate_state, quota_state)

    def _due(self, now: float) -> None:
        if now >= self._next_sweep:
            self.sweep(now)
        if now >= self._day_end or now < self._day_end - DAY_SECONDS:
            self._turn_day(now)
        self._next_due = min(self._next_sweep, self._day_end)

    def _turn_day(self, now: float) -> None:
        day = day_of(now)
        self._day, self._day_end = day, (day + 1) * DAY_SECONDS
        today = self._days.get(day)
        if today is None:
            today = self._days[day] = {}
        self._today = today

    async def refund(self, subject: str, receipt: Receipt) -> int:
        return self._settle(subject, receipt, -receipt.cost)

    async def charge(self, subject: str, receipt: Receipt, units: int) -> int:
        return self._settle(subject, receipt, units)

    def _settle(self, subject: str, receipt: Receipt, change: int) -> int:
        """Move the units of the counters `receipt` names by `change` (never below zero);
        the units moved on the quota, as a positive number."""
        moved = 0
        quota = receipt.quota
        counter = None
        if quota is not None:
            counter = self._counter_of(subject, receipt.period_start, quota.per)
        if counter is not None and counter.stamp == receipt.quota_stamp:
            moved = change if change > 0 else min(-change, counter.used)
            counter.used += change if change > 0 else -moved
        record = self._days.get(receipt.day, {}).get(subject)
        if record is not None and record.stamp == receipt.day_stamp:
            counts = record.counts.get(receipt.plan)
            if counts is not None:
                counts[1] += change if change > 0 else -min(-change, counts[1])
        return moved

    async def credit(
        self, subject: str, quota: QuotaRule, amount: int, once: str | None = None
    ) -> Credited:
        now = self._clock()
        if once is not None:
            kept = self._credit_keys
            while kept:  # forget the expired, oldest first (insertion order)
                oldest = next(iter(kept))
                if kept[oldest][1] > now:
                    break
                del kept[oldest]
            earlier = kept.get((subject, once))
            # (Checked too: the pruning stops at the first live entry, and one behind it may be
            # past its time if the clock stepped back.)
            if earlier is not None and earlier[1] > now:
                return Credited(await self.usage(subject, quota), earlier[0], replayed=True)
            kept[(subject, once)] = (amount, now + CREDIT_KEY_TTL)
        counter = self._current(subject, quota, now)
        counter.credit += amount
        return Credited(await self.usage(subject, quota), amount)

    async def usage(self, subject: str, quota: QuotaRule) -> QuotaUsage:
        start, end = self._periods.period(self._clock(), quota.per, quota.timezone)
        counter = self._counter_of(subject, start, quota.per)
        used = credit = 0
        if counter is not None:
            used, credit = counter.used, counter.credit
        limit = quota.limit + credit
        return QuotaUsage(
            limit=limit, used=used, remaining=max(0, limit - used), reset_at=end, credit=credit
        )

    async def reset_quota(self, subject: str, quota: QuotaRule) -> None:
        start, _ = self._periods.period(self._clock(), quota.per, quota.timezone)
        counter = self._counter_of(subject, start, quota.per)  # this rule's period's, if any
        if counter is not None:
            # A new incarnation too: refunds of requests admitted before the reset then leave
            # it alone instead of taking from requests admitted since.
            counter.used = 0
            counter.stamp = next(self._stamps)

    async def history(self, key_name: str, first_day: int, last_day: int) -> list[DayUsage]:
        prefix = key_name + ":"
        found: list[DayUsage] = []
        for day in range(first_day, last_day + 1):
            subjects = self._days.get(day)
            if subjects:
                mine = sorted(s for s in subjects if s.startswith(prefix))
                found.extend(_lines(day, mine, subjects))
        return found

    async def export(self, first_day: int, last_day: int) -> AsyncGenerator[list[DayUsage], None]:
        for day in range(first_day, last_day + 1):
            subjects = self._days.get(day)
            if not subjects:
                continue
            ordered = sorted(subjects, key=subject_order)
            for begin in range(0, len(ordered), _EXPORT_BATCH):
                yield _lines(day, ordered[begin : begin + _EXPORT_BATCH], subjects)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._rates.clear()
        self._quotas.clear()

    def sweep(self, now: float) -> None:
        """Drop every subject whose rate window and quota period are over, and history older
        than it is kept."""
        self._next_sweep = now + self._sweep_interval
        for subject in [s for s, log in self._rates.items() if _rate_log_expired(log, now)]:
            del self._rates[subject]
        for subject in [s for s, count in self._quotas.items() if count.end <= now]:
            del self._quotas[subject]
        for aside in [a for a, count in self._set_aside.items() if count.end <= now]:
            del self._set_aside[aside]
        oldest = day_of(now - HISTORY_DAYS * DAY_SECONDS)
        for day in [d for d in self._days if d < oldest]:
            del self._days[day]

    @property
    def tracked_subjects(self) -> int:
        """How many subjects hold limit state; for tests and debugging."""
        return len(self._rates.keys() | self._quotas.keys())

    def _current(self, subject: str, quota: QuotaRule, now: float) -> _QuotaCount:
        start, end = self._periods.period(now, quota.per, quota.timezone)
        counter = self._quotas.get(subject)
        if counter is None or counter.start != start or counter.per != quota.per:
            counter = self._switch(subject, counter, start, end, quota.per, now)
        return counter

    def _counter_of(self, subject: str, start: float, per: str) -> _QuotaCount | None:
        """The subject's counter of the period of kind `per` that starts at `start`: in use,
        or set aside."""
        counter = self._quotas.get(subject)
        if counter is None or counter.start != start or counter.per != per:
            counter = self._set_aside.get((subject, start, per))
        return counter

    def _switch(
        self,
        subject: str,
        counter: _QuotaCount | None,
        start: float,
        end: float,
        per: str,
        now: float,
    ) -> _QuotaCount:
        """The subject's counter of the period [start, end) of kind `per`, in place of
        `counter`: that of another period, set aside while its period lasts (the rule changed,
        and may change back), or of one that has ended."""
        if counter is not None and counter.end > now:
            self._set_aside[(subject, counter.start, counter.per)] = counter
        found = self._set_aside.pop((subject, start, per), None)
        if found is None:
            found = _QuotaCount(start, end, per, next(self._stamps))
        self._quotas[subject] = found
        return found


def _lines(day: int, subjects: list[str], records: dict[str, _Day]) -> list[DayUsage]:
    return [
        DayUsage(day, subject, plan, requests, units)
        for subject in subjects
        for plan, (requests, units) in sorted(records[subject].counts.items())
    ]


def _rate_log_expired(log: _RateLog, now: float) -> bool:
    return not log.admitted or log.admitted[-1] <= now - log.window
