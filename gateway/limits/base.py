"""What the request path asks of a limit storage, whatever the storage is.

A `Limiter` checks and consumes the rate and the quota of one subscription (an API key on
one product) in one atomic step and answers with a `Decision`. A rejected request consumes
nothing. Storage failures are raised as `StorageError`; the request path decides, from
`storage.on_error`, whether that means 503 or admission.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

from gateway.config.model import QuotaRule, RateRule

Outcome = Literal["allowed", "throttled", "quota_exceeded"]


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


class Decision(NamedTuple):
    outcome: Outcome
    rate: WindowState | None
    quota: WindowState | None
    retry_after: float = 0.0  # seconds until one more request could be admitted; 0 if allowed

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
    return Decision(outcome, rate, quota, retry_after)


@dataclass(frozen=True, slots=True)
class QuotaUsage:
    limit: int
    used: int
    remaining: int
    reset_at: float  # unix time at which the current period ends


class Limiter(Protocol):
    async def hit(self, subject: str, rate: RateRule | None, quota: QuotaRule | None) -> Decision:
        """Check both limits of `subject`; consume one of each only if both admit."""
        ...

    async def usage(self, subject: str, quota: QuotaRule) -> QuotaUsage: ...

    async def reset_quota(self, subject: str, quota: QuotaRule) -> None: ...

    async def ping(self) -> None:
        """Raise StorageError unless the storage answers."""
        ...

    async def close(self) -> None: ...
