"""YAML as a person edits it by hand: names YAML would type, anchors and merge keys, a byte
order mark, CRLF line ends. Each is read as written, or reported as `file:line: path: ...`."""

from __future__ import annotations

from pathlib import Path

from gateway.config import AuthConfig, ServerConfig, StorageConfig, load_config
from tests.support.config import MINIMAL_PRODUCTS, issues_of


def test_a_plan_or_key_named_like_a_number_or_boolean_is_referred_to_as_written(
    tmp_path: Path,
) -> None:
    """A mapping key is read as text, so `plans:` declared `2025:` and `no:`; the values
    naming them (`shop: 2025`, `name: 123`) were "must be a string" of a plan that exists."""
    path = tmp_path / "gateway.yaml"
    path.write_text(
        MINIMAL_PRODUCTS
        + """\
plans:
  2025: {rate: {limit: 1, per: second}}
  no: {rate: {limit: 2, per: second}}
  1.5: {rate: {limit: 3, per: second}}
keys:
  - {name: 123, key: one, plans: {shop: 2025}}
  - {name: yes, key: two, plans: {shop: no}}
  - {name: 1.5, key: three, plans: {shop: {plan: 1.5, rate: {limit: 4, per: second}}}}
""",
        encoding="utf-8",
    )
    config = load_config(path, env={})
    assert sorted(config.plans) == ["1.5", "2025", "no"]
    assert [(key.name, key.plans) for key in config.keys] == [
        ("123", {"shop": "2025"}),
        ("yes", {"shop": "no"}),
        ("1.5", {"shop": "1.5"}),
    ]


def test_a_duration_of_hours_and_minutes_together(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "server:\n  drain_timeout: 1h30m\n  timeouts: {keepalive: 1m 30s}\n" + MINIMAL_PRODUCTS,
        encoding="utf-8",
    )
    server = load_config(path, env={}).server
    assert (server.drain_timeout, server.timeouts.keepalive) == (5400.0, 90.0)


def test_anchors_and_merge_keys_in_products_and_plans(tmp_path: Path) -> None:
    """`<<: *base` fills what a mapping leaves out: its own keys win, then the first source's
    own keys, then what that source merged itself, then the next source."""
    path = tmp_path / "gateway.yaml"
    path.write_text(
        """\
products:
  shop: &shop
    upstream: &upstream {url: "http://127.0.0.1:9000", timeout: 5s}
    routes: [{path: /shop}]
    maintenance: {retry_after: 60}
  outlet:
    <<: *shop
    upstream: {<<: *upstream, url: "http://127.0.0.1:9001"}
    routes: [{path: /outlet}]
plans:
  slow: &slow {rate: {limit: 1, per: second}, quota: {limit: 10, per: day}}
  daily: &daily {<<: *slow, quota: {limit: 20, per: day}}
  mixed: {<<: [*daily, {rate: {limit: 3, per: second}}]}
  own: {<<: [*daily, *slow], rate: {limit: 4, per: second}}
""",
        encoding="utf-8",
    )
    config = load_config(path, env={})
    outlet = config.products["outlet"]
    assert (outlet.upstream.url, outlet.upstream.timeout) == ("http://127.0.0.1:9001", 5.0)
    assert [route.path for route in outlet.routes] == ["/outlet"]
    assert outlet.maintenance is not None and outlet.maintenance.retry_after == 60
    limits = {
        name: (plan.rate and plan.rate.limit, plan.quota and plan.quota.limit)
        for name, plan in config.plans.items()
    }
    assert limits == {"slow": (1, 10), "daily": (1, 20), "mixed": (1, 20), "own": (4, 20)}


def test_a_long_chain_of_merges_is_read_without_recursion(tmp_path: Path) -> None:
    """Each merge was a level of recursion: 1,500 of them were a RecursionError."""
    chain = ["  m0: &m0 {rate: {limit: 7, per: second}}"]
    chain += [f"  m{i}: &m{i} {{<<: *m{i - 1}}}" for i in range(1, 1500)]
    path = tmp_path / "gateway.yaml"
    path.write_text(MINIMAL_PRODUCTS + "plans:\n" + "\n".join(chain) + "\n", encoding="utf-8")
    rate = load_config(path, env={}).plans["m1499"].rate
    assert rate is not None and rate.limit == 7


def test_a_byte_order_mark_and_crlf_line_ends_are_read_as_any_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    text = MINIMAL_PRODUCTS + "plans:\n  trial: {rate: {limit: x, per: second}}\n"
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    assert issues_of(path) == [f"{path}:7: plans.trial.rate.limit: must be an integer"]


def test_a_section_with_every_entry_commented_out_is_an_empty_one(tmp_path: Path) -> None:
    """`keys:` over commented-out entries is null in YAML: it was "keys: must be a list"."""
    path = tmp_path / "gateway.yaml"
    path.write_text(
        MINIMAL_PRODUCTS
        + """\
server:
  # listen: 0.0.0.0:8080
storage:
auth:
plans:
  # trial: {rate: {limit: 1, per: second}}
keys:
  # - {name: acme, key: secret, plans: {shop: trial}}
""",
        encoding="utf-8",
    )
    config = load_config(path, env={})
    assert (config.server, config.storage, config.auth) == (
        ServerConfig(),
        StorageConfig(),
        AuthConfig(),
    )
    assert (config.plans, config.keys) == ({}, ())
