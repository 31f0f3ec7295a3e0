"""What the request path asks of a limit storage, whatever the storage is.

A `Limiter` checks and consumes the rate and the quota of one subscription (an API key on
one product) in one atomic step and answers with a `Decision`. A rejected request consumes
nothing. Storage failures are raised as `StorageError`; the request path decides, from
`storage.on_error`, whether that means 503 or admission.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from datetime import date
from typing import Literal, NamedTuple, Protocol

from gateway.config.model import QuotaRule, RateRule

Outcome = Literal["allowed", "throttled", "quota_exceeded"]


_EPOCH_DATE = date
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


class StorageError(Exception):
    """The limit storage did not answer, or answered with an error, within its timeout."""


# WindowState and Decision are made on every request, three per hit: as named tuples they
# cost a fifth of what frozen dataclasses do (no per-field object.__setattr__), and the
# limiters build them with tuple.__new__, which skips even the generated __new__.
class WindowState(NamedTuple):
    """One limit after the decision: what the limit headers report (README, "Headers")."""

    limit: int
    remaining: int
    reset: float  # seconds from now until the window or period frees room / ends
    window: float  # length of the window or of the current period, in seconds


class Receipt(NamedTuple):
    """What an admission took, kept until the request's outcome is known, so that it can be
    settled: its units given back, or more taken for a cost its upstream reported (README
    "Metering"). The stamps name the incarnation of the counters the units went into: a
    settlement only touches those very counters, so one that meets a counter recreated since
    (a restarted storage, a period that ended) does nothing to it."""

    cost: int
    plan: str
    period_start: float  # of the quota period charged
    quota_stamp: int
    day: int  # the UTC day (days since 1970-01-01) the request was counted on
    day_stamp: int
    # The quota charged: its kind of period tells the period apart from one of another kind
    # that began at the same instant (a day that begins a month). None: the plan has no quota
    # (the period and its stamp are then 0), and only the day's history is settled.
    quota: QuotaRule | None


class Decision(NamedTuple):
    outcome: Outcome
    rate: WindowState | None
    quota: WindowState | None
    retry_after: float = 0.0  # seconds until one more request could be admitted; 0 if allowed
    # Set on an admission whose caller asked to settle it (its plan has refund_on, or its
    # route takes the cost its upstream reports): what settling it needs.
    receipt: Receipt | None = None

    @property
    def allowed(self) -> bool:
        return self.outcome == "allowed"


def make_decision(
    outcome: Outcome, rate: WindowState | None, quota: WindowState | None
) -> Decision:
    """The decision with its retry-after, which follows from whichever limit said no."""
    retry_after = 0.0
    if outcome == "quota_exceeded" and quota is not None:
        retry_after = quota.reset
    elif outcome == "throttled" and rate is not None:
        # A limit of 0 never frees room; a window is the honest smallest answer.
        retry_after = rate.reset if rate.reset > 0 else rate.window
    return Decision(outcome, rate, quota, retry_after, None)


# Told what the storage decided for a check whose caller was cancelled (Limiter.hit).
Abandoned = Callable[[Decision], None]


@dataclass(frozen=True, slots=True)
class QuotaUsage:
    limit: int  # the plan's limit plus this period's credit
    used: int
    remaining: int
    reset_at: float  # unix time at which the current period ends
    credit: int = 0


# How long a credit's idempotency key is remembered: a retry within this is applied at most
# once (a day, as payment APIs keep theirs).
CREDIT_KEY_TTL = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Credited:
    """What a credit call did."""

    usage: QuotaUsage  # the quota after it
    amount: int  # the units credited under its idempotency key (the first call's, if replayed)
    replayed: bool = False  # its idempotency key was used before: nothing was added this time


@dataclass(frozen=True, slots=True)
class DayUsage:
    """One line of the usage history: a subscription's admitted requests on one UTC day."""

    day: int  # days since 1970-01-01
    subject: str  # "<key name>:<product>"
    plan: str
    requests: int
    units: int  # quota units kept after refunds


class Limiter(Protocol):
    async def hit(
        self,
        subject: str,
        rate: RateRule | None,
        quota: QuotaRule | None,
        cost: int = 1,
        plan: str = "",
        abandoned: Abandoned | None = None,
        settles: bool = False,
    ) -> Decision:
        """Check both limits of `subject`; only if both admit, take one request of the rate
        and `cost` units of the quota, and count the request in the day's history under
        `plan`. A quota with fewer than `cost` units left refuses.

        `abandoned` is told what the storage decided for a caller that was cancelled while
        the check was on its way (its client left): the storage still decides, and what it
        took must be settled like any admission's. An admission carries a receipt, naming the
        counters it went into, when `settles` asks for one: the caller decides whether the
        request may be settled (its plan refunds some outcomes, or its upstream reports the
        cost)."""
        ...

    async def refund(self, subject: str, receipt: Receipt) -> int:
        """Give back the units of one admission, at most once per receipt's counters and never
        below zero; the units actually returned to the quota (0 when its counter is gone)."""
        ...

    async def charge(self, subject: str, receipt: Receipt, units: int) -> int:
        """Take `units` more for one admission, in the counters its receipt names (the
        quota's and the day's units), whatever the quota's limit: they were used already.
        The units added to the quota (0 when its counter is gone or the plan has none)."""
        ...

    async def credit(
        self, subject: str, quota: QuotaRule, amount: int, once: str | None = None
    ) -> Credited:
        """Add `amount` units to the current period's allowance. With `once` (an idempotency
        key), only if no credit of `subject` used that key in the last `CREDIT_KEY_TTL`."""
        ...

    async def usage(self, subject: str, quota: QuotaRule) -> QuotaUsage: ...

    async def reset_quota(self, subject: str, quota: QuotaRule) -> None:
        """Nothing used in the current period any more; credit stays."""
        ...

    async def history(self, key_name: str, first_day: int, last_day: int) -> list[DayUsage]:
        """The key's days with requests, on every product, sorted by day, product, plan."""
        ...

    def export(self, first_day: int, last_day: int) -> AsyncGenerator[list[DayUsage], None]:
        """Every subscription's days with requests, in batches, sorted by day, key, product,
        plan; never the whole range in memory at once."""
        ...

    async def ping(self) -> None:
        """Raise StorageError unless the storage answers."""
        ...

    async def close(self) -> None: ...


# History is kept this many days after the day it counts (README "Metering").
HISTORY_DAYS = 400
DAY_SECONDS = 86400


def day_of(unix_time: float) -> int:
    """The UTC day of `unix_time`, as days since 1970-01-01."""
    return int(unix_time // DAY_SECONDS)


def day_text(day: int) -> str:
    """`YYYY-MM-DD` of a day number."""
    return _EPOCH_DATE.fromordinal(_EPOCH_ORDINAL + day).isoformat()


def day_number(text: str) -> int:
    """The day number of `YYYY-MM-DD`; ValueError otherwise."""
    return _EPOCH_DATE.fromisoformat(text).toordinal() - _EPOCH_ORDINAL


def subject_order(subject: str) -> tuple[str, str]:
    """Sorted by key name, then product (a plain string sort would put "a.b:x" before "a:x")."""
    key, _, product = subject.partition(":")
    return key, product
