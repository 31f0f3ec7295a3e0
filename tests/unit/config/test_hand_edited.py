"""YAML as a person edits it by hand: names YAML would type, anchors and merge keys, a byte
order mark, CRLF line ends. Each is read as written, or reported as `file:line: path: ...`."""

from __future__ import annotations

from pathlib import Path

from gateway.config import load_config
from tests.support.config import MINIMAL_PRODUCTS


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
