"""A key's plans and the metering parts of the configuration: route cost, quota refund_on,
per-key overrides (in the file and as data, as the admin keys API gives them), and
storage.on_error: local."""

from __future__ import annotations

import gc
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gateway.config import ConfigError, Plan, QuotaRule, RateRule, load_config
from gateway.config.access import validate_key_plans
from gateway.config.model import PlanOverride

CONFIG = """\
storage: {url: "memory://", on_error: local, local_fraction: 0.3}
products:
  soccer:
    upstream: {url: "http://127.0.0.1:9000"}
    routes:
      - path: /soccer/heavy
        cost: 10
      - path: /soccer/light
  weather:
    upstream: {url: "http://127.0.0.1:9000"}
    routes:
      - path: /weather
plans:
  production:
    rate: {limit: 10, per: second}
    quota: {limit: 1000, per: month, timezone: Europe/Berlin, refund_on: [5xx, 499]}
  trial:
    rate: {limit: 1, per: second}
    quota: {limit: 100, per: month, refund_on: []}
keys:
  - name: acme
    key: acme-secret
    plans:
      soccer: {plan: production, quota: {limit: 50, per: day}}
      weather: {plan: trial, rate: {limit: 5, per: second}}
"""


def test_metering_config_is_read(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG)
    config = load_config(path, env={})
    assert (config.storage.on_error, config.storage.local_fraction) == ("local", 0.3)
    heavy, light = config.products["soccer"].routes
    assert (heavy.cost, light.cost) == (10, 1)
    production = config.plans["production"]
    assert production.quota is not None
    assert production.quota.refund_on == frozenset({"5xx", "499"})
    assert config.plans["trial"].quota == QuotaRule(100, "month", ZoneInfo("UTC"))

    acme = config.keys[0]
    assert acme.plans == {"soccer": "production", "weather": "trial"}
    soccer = acme.plan_for("soccer", config.plans)
    # The key's own quota, under the plan's name, with the plan's rate and refund_on.
    assert soccer == Plan(
        "production",
        RateRule(10, 1.0, "second"),
        QuotaRule(50, "day", ZoneInfo("UTC"), frozenset({"5xx", "499"})),
    )
    weather = acme.plan_for("weather", config.plans)
    assert weather == Plan("trial", RateRule(5, 1.0, "second"), config.plans["trial"].quota)
    assert acme.plan_for("hockey", config.plans) is None


def test_an_override_that_lists_refund_on_keeps_its_own() -> None:
    plans, overrides = validate_key_plans(
        {"soccer": {"plan": "production", "quota": {"limit": 5, "per": "day", "refund_on": []}}},
        {"soccer"},
        {"production"},
    )
    base = Plan("production", None, QuotaRule(9, "month", ZoneInfo("UTC"), frozenset({"5xx"})))
    assert plans == {"soccer": "production"}
    quota = overrides["soccer"].apply(base).quota
    assert quota is not None and quota.refund_on == frozenset()
    assert PlanOverride().apply(base) == base


def test_reading_key_plans_as_data_leaves_nothing_for_the_cyclic_collector() -> None:
    """Each admin write of a key reads its plans this way; a YAML dumper left referring to
    itself was kept for good by the next reload's gc.freeze, with the nodes it made."""
    validate_key_plans({"soccer": "trial"}, {"soccer"}, {"trial"})  # warm: lazy imports
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        validate_key_plans({"soccer": {"plan": "trial"}}, {"soccer"}, {"trial"})
        gc.collect()
        kept = sorted({type(thing).__name__ for thing in gc.garbage})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert kept == [], kept


def test_key_plans_as_data_give_the_file_messages_with_paths() -> None:
    with pytest.raises(ConfigError) as caught:
        validate_key_plans(
            {
                "soccer": {"plan": "gold", "rate": {"limit": 0, "per": "second"}},
                "hockey": "trial",
                "weather": {"quota": {"limit": 5, "per": "day"}},
            },
            {"soccer", "weather"},
            {"trial"},
        )
    assert [f"{issue.path}: {issue.message}" for issue in caught.value.issues] == [
        "plans.soccer.rate.limit: must be at least 1",
        "plans.soccer.plan: unknown plan 'gold' (plans: trial)",
        "plans.hockey: unknown product (products: soccer, weather)",
        "plans.weather.plan: is required",
    ]
    assert all(issue.line is None for issue in caught.value.issues)
    for not_a_mapping in ([1], "trial", None, 5):
        with pytest.raises(ConfigError, match="plans: must be a mapping"):
            validate_key_plans(not_a_mapping, None, None)
