"""The quotas and keys the limit storages' metering tests use: a monthly quota that refunds
5xx answers or none, and a key unique per call.
"""

from __future__ import annotations

import uuid
from zoneinfo import ZoneInfo

from gateway.config.model import QuotaRule

UTC = ZoneInfo("UTC")
REFUND_5XX: frozenset[str] = frozenset({"5xx"})


def quota(limit: int, refund: bool = True) -> QuotaRule:
    return QuotaRule(limit, "month", UTC, REFUND_5XX if refund else frozenset())  # type: ignore[arg-type]


def new_key() -> str:
    return f"meter-{uuid.uuid4().hex[:10]}"
