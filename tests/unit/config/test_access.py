"""A key's plans and the metering parts of the configuration: route cost, quota refund_on,
per-key overrides (in the file and as data, as the admin keys API gives them), and
storage.on_error: local."""

from __future__ import annotations

import gc
import re
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


PLAN_REFUNDS = """\
products:
  soccer:
    upstream: {url: "http://127.0.0.1:9000"}
    routes:
      - path: /soccer
plans:
  metered:
    rate: {limit: 10, per: second}
    refund_on: [5xx]
  monthly:
    quota: {limit: 100, per: month}
    refund_on: [499]
  plain:
    quota: {limit: 100, per: month}
keys:
  - name: acme
    key: acme-secret
    plans: {soccer: {plan: metered, quota: {limit: 50, per: day}}}
"""


def test_a_plan_lists_refund_on_of_its_own_with_or_without_a_quota(tmp_path: Path) -> None:
    """Without a quota the plan's own list refunds its day's units; beside a quota it is
    the quota's, as if written under it; a key's own quota keeps the plan's list."""
    path = tmp_path / "gateway.yaml"
    path.write_text(PLAN_REFUNDS)
    plans = load_config(path, env={}).plans
    metered, monthly, plain = plans["metered"], plans["monthly"], plans["plain"]
    assert (metered.quota, metered.refund_on) == (None, frozenset({"5xx"}))
    assert metered.refunds(503, False) and not metered.refunds(499, True)
    assert monthly.quota is not None and monthly.quota.refund_on == frozenset({"499"})
    assert monthly.refund_on == frozenset({"499"}) and monthly.refunds(499, True)
    assert plain.refund_on == frozenset() and not plain.refunds(503, False)
    acme = load_config(path, env={}).keys[0].plan_for("soccer", plans)
    assert acme is not None and acme.quota is not None
    assert (acme.quota.limit, acme.quota.refund_on) == (50, frozenset({"5xx"}))
    assert acme.refund_on == frozenset({"5xx"})


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


# Keys written the usual way and every near miss of that way: `KeysReader._plain_key` reads the
# first kind quickly and must leave every other to the full reading. H07 stands for a digest
# (62 a's, then 07), U02 for the same in upper case as H02.
KEYS_BOTH_WAYS_TEMPLATE = """\
keys:
  - {name: plain, key_sha256: H01, plans: {soccer: trial}}
  - name: "quoted"
    key_sha256: 'U02'
    plans: {soccer: production, weather: trial}
  - {name: !!str tagged, key_sha256: H03}
  - {name: no-plans-at-all, key_sha256: H04, plans: {}}
  - &shared {name: anchored, key_sha256: H05}
  - *shared
  - {name: plain, key_sha256: H06}
  - {name: other, key_sha256: H02}
  - {name: a b, key_sha256: H07}
  - {name: 12, key_sha256: H08}
  - {name: short, key_sha256: abc}
  - {name: with-key, key: a-secret, plans: {soccer: trial}}
  - {name: both, key: b, key_sha256: H09}
  - {name: switched-off, key_sha256: H10, disabled: true}
  - {name: ends, key_sha256: H11, expires: 2030-01-01}
  - {name: p1, key_sha256: H12, plans: {nothing: trial}}
  - {name: p2, key_sha256: H13, plans: {soccer: gold}}
  - {name: p3, key_sha256: H14, plans: {soccer: " "}}
  - {name: p4, key_sha256: H15, plans: {soccer: trial, soccer: production}}
  - {name: p5, key_sha256: H16, plans: }
  - {name: p6, key_sha256: H17, plans: {soccer: {plan: trial}}}
  - {name: p7, key_sha256: H18, plans: {1: trial}}
  - {name: p8, key_sha256: H19, plans: {soccer: 1}}
  - {name: d1, name: d2, key_sha256: H20}
  - {<<: {name: merged}, key_sha256: H21}
  - {name: extra, key_sha256: H22, colour: red}
  - {name: no-secret}
  - {key_sha256: H23}
  - [not, a, mapping]
  - {name: last, key_sha256: H24, plans: {weather: production}}
"""
KEYS_BOTH_WAYS = re.sub(
    "([HU])([0-9]{2})",
    lambda m: ("a" if m[1] == "H" else "A") * 62 + m[2],
    KEYS_BOTH_WAYS_TEMPLATE,
)


def test_plain_keys_are_read_as_the_full_reading_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.config.access import KeysReader

    (tmp_path / "gateway.yaml").write_text(CONFIG.split("keys:")[0])
    (tmp_path / "keys.yaml").write_text(KEYS_BOTH_WAYS)
    plain_key = KeysReader._plain_key
    read_plainly: list[str] = []

    def counted(self: KeysReader, node: object, index: int) -> object:
        key = plain_key(self, node, index)  # type: ignore[arg-type]
        if key is not None:
            read_plainly.append(key.name)
        return key

    def results() -> tuple[list[str], object]:
        try:
            return [], load_config(tmp_path, env={})
        except ConfigError as exc:
            return [str(issue) for issue in exc.issues], None

    monkeypatch.setattr(KeysReader, "_plain_key", counted)
    quick = results()
    monkeypatch.setattr(KeysReader, "_plain_key", lambda *_: None)
    assert results() == quick
    assert read_plainly == ["plain", "quoted", "tagged", "no-plans-at-all", "anchored", "last"]
    # `name: 12` is a name as written (read by the full reading), `soccer: 1` an unknown plan.
    assert len(quick[0]) == 19, "\n".join(quick[0])
    # And the keys themselves, with a config whose keys are all valid.
    (tmp_path / "keys.yaml").write_text(KEYS_BOTH_WAYS.split("  - *shared")[0])
    monkeypatch.setattr(KeysReader, "_plain_key", plain_key)
    quick = results()
    monkeypatch.setattr(KeysReader, "_plain_key", lambda *_: None)
    assert results() == quick
    assert quick[1] is not None
