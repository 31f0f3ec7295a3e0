"""The `plans` and `keys` sections: what each API key may do on which product."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from yaml.nodes import Node

from gateway.config.durations import DURATION_HINT, parse_duration
from gateway.config.instants import parse_instant
from gateway.config.model import (
    QUOTA_PERIODS,
    RATE_PERIOD_SECONDS,
    ApiKey,
    Plan,
    QuotaPeriod,
    QuotaRule,
    RateRule,
)
from gateway.config.products import NAME, NAME_HINT
from gateway.config.yamlnodes import ConfigError, ConfigIssue, Fields, Walker, line_of

_PLAN_KEYS = ("rate", "quota")
_RATE_KEYS = ("limit", "per")
_QUOTA_KEYS = ("limit", "per", "timezone")
_KEY_KEYS = ("name", "key", "key_sha256", "plans", "disabled", "expires")
_SHA256_HEX = re.compile(r"[0-9A-Fa-f]{64}")
_RATE_PER_HINT = (
    f"must be one of {', '.join(RATE_PERIOD_SECONDS)} or {DURATION_HINT.removeprefix('must be ')}"
)


def _instant(w: Walker, node: Node, path: str) -> float | None:
    try:
        return parse_instant(w.scalar(node))
    except ValueError as exc:
        w.report(node, path, str(exc))
        return None


def read_plans(w: Walker, node: Node) -> tuple[dict[str, Plan], set[str] | None]:
    """The valid plans, and the names of all declared ones (None if there is no mapping)."""
    fields = w.mapping(node, "plans")
    if fields is None:
        return {}, None
    plans: dict[str, Plan] = {}
    for name, key, value in fields:
        path = fields.at(name)
        if not NAME.fullmatch(name):
            w.report(key, path, NAME_HINT)
            continue
        if w.is_null(value):  # `free:` with nothing under it: a plan without limits
            plans[name] = Plan(name)
            continue
        plan = w.mapping(value, path, _PLAN_KEYS)
        if plan is not None:
            rate = w.optional(plan, "rate", lambda n, p: _rate(w, n, p), None)
            quota = w.optional(plan, "quota", lambda n, p: _quota(w, n, p), None)
            plans[name] = Plan(name, rate, quota)
    return plans, set(fields.entries)


def _rate(w: Walker, node: Node, path: str) -> RateRule | None:
    fields = w.mapping(node, path, _RATE_KEYS)
    if fields is None:
        return None
    limit = w.required(fields, "limit", w.positive)
    per = w.required(fields, "per", lambda n, p: _rate_window(w, n, p))
    return None if limit is None or per is None else RateRule(limit, per[0], per[1])


def _rate_window(w: Walker, node: Node, path: str) -> tuple[float, str] | None:
    """The window in seconds and its name as written: a period name or a duration."""
    value = w.scalar(node)
    if isinstance(value, str) and value in RATE_PERIOD_SECONDS:
        return RATE_PERIOD_SECONDS[value], value
    try:
        seconds = parse_duration(value)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        w.report(node, path, _RATE_PER_HINT)
        return None
    return seconds, str(value)


def _quota(w: Walker, node: Node, path: str) -> QuotaRule | None:
    fields = w.mapping(node, path, _QUOTA_KEYS)
    if fields is None:
        return None
    limit = w.required(fields, "limit", w.positive)
    per: QuotaPeriod | None = w.required(fields, "per", lambda n, p: _quota_period(w, n, p))
    zone = w.optional(fields, "timezone", lambda n, p: _zone(w, n, p), ZoneInfo("UTC"))
    return None if limit is None or per is None else QuotaRule(limit, per, zone)


def _quota_period(w: Walker, node: Node, path: str) -> QuotaPeriod | None:
    choice = w.choice(node, path, QUOTA_PERIODS)
    # The same string, taken from QUOTA_PERIODS so that it carries the Literal type.
    return next((period for period in QUOTA_PERIODS if period == choice), None)


def _zone(w: Walker, node: Node, path: str) -> ZoneInfo | None:
    name = w.string(node, path)
    if name is None:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        w.report(node, path, f"unknown time zone {name!r} (IANA names like Europe/Berlin)")
        return None


class KeysReader:
    """Reads the `keys` list, checking names and secrets are unique and plans exist.

    `products` and `plans` are the declared names, or None when their section was itself
    broken: then references are not checked, rather than reported as unknown.
    """

    def __init__(self, walker: Walker, products: set[str] | None, plans: set[str] | None) -> None:
        self.w = walker
        self.products = products
        self.plans = plans
        self._names: dict[str, str] = {}  # name -> where it was first declared
        self._digests: dict[str, str] = {}  # sha256 -> the key that has it

    def read(self, node: Node) -> tuple[ApiKey, ...]:
        items = self.w.sequence(node, "keys")
        if items is None:
            return ()
        keys = (self._key(item, f"keys[{index}]") for index, item in enumerate(items))
        return tuple(key for key in keys if key is not None)

    def _key(self, node: Node, path: str) -> ApiKey | None:
        w = self.w
        fields = w.mapping(node, path, _KEY_KEYS)
        if fields is None:
            return None
        where = f"{path}, line {line_of(node)}"
        name = w.required(fields, "name", w.string)
        if name is not None:
            if not NAME.fullmatch(name):
                w.report(fields.value("name"), fields.at("name"), NAME_HINT)
            elif name in self._names:
                message = f"duplicate key name {name!r} (first in {self._names[name]})"
                w.report(fields.value("name"), fields.at("name"), message)
            else:
                self._names[name] = where
        digest = self._digest(fields, path)
        if digest is not None:
            secret = "key" if "key" in fields else "key_sha256"
            if digest in self._digests:
                message = f"the same secret as {self._digests[digest]}"
                w.report(fields.value(secret), fields.at(secret), message)
            else:
                self._digests[digest] = f"{name!r} ({where})" if name else where
        plans_node = fields.value("plans")
        plans: dict[str, str] = {}
        if plans_node is not None:
            plans = read_key_plans(w, plans_node, fields.at("plans"), self.products, self.plans)
        disabled = w.optional(fields, "disabled", w.boolean, False)
        expires = w.optional(fields, "expires", lambda n, p: _instant(w, n, p), None)
        if name is None or digest is None:
            return None
        return ApiKey(name, digest, plans, disabled, expires=expires)

    def _digest(self, fields: Fields, path: str) -> str | None:
        """The lower-case SHA-256 of the secret; a plain `key` is hashed and then forgotten."""
        w = self.w
        if "key" in fields and "key_sha256" in fields:
            w.report(fields.node, path, "has both key and key_sha256; keep one")
            return None
        if "key" in fields:
            plain = w.required(fields, "key", w.string)
            return None if plain is None else hashlib.sha256(plain.encode()).hexdigest()
        if "key_sha256" not in fields:
            w.report(fields.node, path, "needs key_sha256 (or key, for demos and tests)")
            return None
        digest = w.required(fields, "key_sha256", w.string)
        if digest is not None and not _SHA256_HEX.fullmatch(digest):
            message = "must be 64 hexadecimal characters (see `gateway hash-key`)"
            w.report(fields.value("key_sha256"), fields.at("key_sha256"), message)
            return None
        return None if digest is None else digest.lower()


def read_key_plans(
    w: Walker,
    node: Node,
    path: str,
    products: Collection[str] | None,
    plans: Collection[str] | None,
) -> dict[str, str]:
    """A key's `plans`: product -> plan name, each product and plan declared in the config.

    The one reader of a key's plans, for the file and for the admin API alike
    (`key_plans_from_data`), so that both accept exactly the same values. `products` and
    `plans` of None skip the check (their own section was broken and is reported already).
    """
    fields = w.mapping(node, path)
    if fields is None:
        return {}
    chosen: dict[str, str] = {}
    for product, product_key, value in fields:
        product_path = fields.at(product)
        if products is not None and product not in products:
            known = ", ".join(sorted(products)) or "none are declared"
            w.report(product_key, product_path, f"unknown product (products: {known})")
            continue
        plan = w.string(value, product_path)
        if plan is not None and plans is not None and plan not in plans:
            known = ", ".join(sorted(plans)) or "none are declared"
            w.report(value, product_path, f"unknown plan {plan!r} (plans: {known})")
            continue
        if plan is not None:
            chosen[product] = plan
    return chosen


def validate_key_plans(
    data: object,
    products: Collection[str] | None,
    plans: Collection[str] | None,
    source: str = "request",
) -> dict[str, str]:
    """`read_key_plans` for a key's `plans` given as data (a JSON body of the admin API): the
    data is turned into YAML nodes and read by the file's own reader, so an API key's plans
    accept and refuse exactly what a file key's do. Raises ConfigError whose issues name the
    path of each bad value (`plans.soccer: unknown plan ...`)."""
    issues: list[ConfigIssue] = []
    # JSON text is YAML; ensure_ascii keeps it inside what PyYAML's reader accepts.
    node = yaml.compose(json.dumps(data), Loader=yaml.SafeLoader)
    if node is None:
        raise ConfigError([ConfigIssue(source, None, "plans", "must be a mapping")])
    chosen = read_key_plans(Walker(source, issues), node, "plans", products, plans)
    if issues:
        raise ConfigError(issues)
    return chosen
