"""A stored API key record read into the key the request path serves (gateway/keys/records.py)."""

from __future__ import annotations

import json
import logging

import pytest

from gateway.keys.records import KeyRecord

DIGEST = "ab" * 32


def stored(plans: dict[str, object]) -> str:
    return json.dumps(
        {
            "name": "acme",
            "key_sha256": DIGEST,
            "plans": plans,
            "disabled": False,
            "expires": None,
            "created": 1.0,
            "updated": 1.0,
            "previous": [],
        }
    )


def test_a_record_keeps_each_products_own_limits() -> None:
    record = KeyRecord.from_json(
        stored(
            {
                "soccer": {"plan": "trial", "rate": {"limit": 5, "per": "second"}},
                "weather": "production",
            }
        )
    )
    key = record.to_api_key()
    assert set(key.overrides) == {"soccer"}
    assert key.plans == {"soccer": "trial", "weather": "production"}


def test_an_entry_that_does_not_read_costs_its_product_alone_and_is_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Older gateways stored a limit sent back in a PATCH as 5.0 or true unchecked: such a
    # record must not take the key's other products' own limits with it, silently.
    record = KeyRecord.from_json(
        stored(
            {
                "soccer": {"plan": "trial", "rate": {"limit": 5.0, "per": "second"}},
                "weather": {"plan": "trial", "quota": {"limit": 7, "per": "day"}},
                "tennis": {"plan": "trial", "rate": {"limit": True, "per": "second"}},
            }
        )
    )
    with caplog.at_level(logging.WARNING, logger="gateway.keys"):
        key = record.to_api_key()
    assert set(key.overrides) == {"weather"}
    said = sorted(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert len(said) == 2, said
    assert said[0].startswith("API key 'acme': its own limits for product 'soccer' cannot be read")
    assert "plans.soccer.rate.limit: must be an integer" in said[0]
    assert "'tennis'" in said[1]
