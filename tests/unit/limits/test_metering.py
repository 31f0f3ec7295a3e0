"""The local share of a rate that one process enforces while the storage is away."""

from __future__ import annotations

import pytest

from gateway.config.model import RateRule
from gateway.limits.metering import local_rate


@pytest.mark.parametrize(
    ("limit", "fraction", "local"),
    [(10, 0.3, 3), (5, 0.5, 3), (1, 0.01, 1), (100, 1.0, 100), (3, 0.34, 2), (7, 0.1, 1)],
)
def test_local_share_of_a_rate_is_rounded_up(limit: int, fraction: float, local: int) -> None:
    assert local_rate(RateRule(limit, 2.0, "2s"), fraction) == RateRule(local, 2.0, "2s")


def test_the_local_share_is_made_once_per_rule_and_fraction() -> None:
    rate = RateRule(10, 2.0, "2s")
    share = local_rate(rate, 0.3)
    assert local_rate(RateRule(10, 2.0, "2s"), 0.3) is share
    assert local_rate(rate, 0.5) == RateRule(5, 2.0, "2s")
