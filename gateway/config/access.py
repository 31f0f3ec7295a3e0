"""The `plans` and `keys` sections: what each API key may do on which product."""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Collection
from dataclasses import replace
from typing import TypeGuard
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from gateway.config.durations import DURATION_HINT, parse_duration
from gateway.config.instants import parse_instant
from gateway.config.model import (
    QUOTA_PERIODS,
    RATE_PERIOD_SECONDS,
    REFUND_OUTCOMES,
    ApiKey,
    Plan,
    PlanOverride,
    QuotaPeriod,
    QuotaRule,
    RateRule,
    RefundOutcome,
)
from gateway.config.products import NAME, NAME_HINT
from gateway.config.yamlnodes import ConfigError, ConfigIssue, Fields, Walker, line_of
from gateway.config.yamltree import (
    MAPPING_TAG,
    STR_TAG,
    MappingNode,
    Node,
    ScalarNode,
    tree_of_pyyaml,
)

_PLAN_KEYS = ("rate", "quota", "refund_on")
_RATE_KEYS = ("limit", "per")
_QUOTA_KEYS = ("limit", "per", "timezone", "refund_on")
_OVERRIDE_KEYS = ("plan", "rate", "quota")
_KEY_KEYS = ("name", "key", "key_sha256", "plans", "disabled", "expires")
_PLAIN = frozenset(("name", "key_sha256", "plans"))  # what `KeysReader._plain_key` reads
SHA256_HEX = re.compile(r"[0-9A-Fa-f]{64}")
# The digest of an empty key. An empty key is no key (a request that sends one has none), so a
# key with this digest could never be presented: `gateway hash-key "$KEY"` with KEY unset.
EMPTY_KEY_SHA256 = hashlib.sha256(b"").hexdigest()
EMPTY_KEY_REFUSAL = (
    "is the SHA-256 of an empty key, which no request can present (an empty key is no key)"
)
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
            refund_on = w.optional(plan, "refund_on", lambda n, p: _refund_on(w, n, p), None)
            if refund_on is None:
                refund_on = quota.refund_on if quota is not None else frozenset()
            elif _writes_refund_on(plan.value("quota")):
                # One list per plan: two could disagree, and neither would be the obvious one.
                given = plan.value("refund_on")
                assert given is not None
                w.report(given, plan.at("refund_on"), "is given under quota too: give it once")
                continue
            elif quota is not None:
                quota = replace(quota, refund_on=refund_on)  # the quota's, as if written there
            plans[name] = Plan(name, rate, quota, refund_on)
    return plans, set(fields.entries)


_LONGEST_RATE_WINDOW = 366 * 24 * 3600.0


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
    if seconds < 0.001:
        # Windows are kept in microseconds; below a millisecond no request could be counted.
        w.report(node, path, "must be at least 1ms")
        return None
    if seconds > _LONGEST_RATE_WINDOW:
        # Longer is a quota's job; the window's timestamps must stay exact in Redis's Lua.
        w.report(node, path, "must be at most 366 days (8784h); a longer limit is a quota")
        return None
    return seconds, str(value)


def _quota(w: Walker, node: Node, path: str) -> QuotaRule | None:
    fields = w.mapping(node, path, _QUOTA_KEYS)
    if fields is None:
        return None
    limit = w.required(fields, "limit", w.positive)
    per: QuotaPeriod | None = w.required(fields, "per", lambda n, p: _quota_period(w, n, p))
    zone = w.optional(fields, "timezone", lambda n, p: _zone(w, n, p), ZoneInfo("UTC"))
    no_refunds: frozenset[RefundOutcome] = frozenset()
    refund_on = w.optional(fields, "refund_on", lambda n, p: _refund_on(w, n, p), no_refunds)
    return None if limit is None or per is None else QuotaRule(limit, per, zone, refund_on)


def _refund_on(w: Walker, node: Node, path: str) -> frozenset[RefundOutcome] | None:
    """The outcomes whose units are given back: a list of 5xx and 499 (may be empty)."""
    items = w.sequence(node, path)
    if items is None:
        return None
    chosen: set[RefundOutcome] = set()
    for index, item in enumerate(items):
        # 499 is written as a number; compared as text, like an enum.
        text = str(item.value) if isinstance(item, ScalarNode) else None
        outcome = next((o for o in REFUND_OUTCOMES if o == text), None)
        if outcome is None:
            w.report(item, f"{path}[{index}]", f"must be one of {', '.join(REFUND_OUTCOMES)}")
            return None
        chosen.add(outcome)
    w.distinct(node, path, [str(item.value) for item in items], "outcome")
    return frozenset(chosen)


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


def _is_text(node: Node | None) -> TypeGuard[ScalarNode]:
    """A scalar read as a string as it is written: plain, quoted, or tagged `!!str`."""
    return type(node) is ScalarNode and node.tag == STR_TAG


class KeysReader:
    """Reads the `keys` list, checking names and secrets are unique and plans exist.

    `products` and `plans` are the declared names, or None when their section was itself
    broken: then references are not checked, rather than reported as unknown.
    """

    def __init__(self, walker: Walker, products: set[str] | None, plans: set[str] | None) -> None:
        self.w = walker
        self.products = products
        self.plans = plans
        # Where each name and secret was first declared, formatted only for a message
        # (`_where`): name -> (key index, line); sha256 -> (index, line, the key's name).
        self._names: dict[str, tuple[int, int]] = {}
        self._digests: dict[str, tuple[int, int, str | None]] = {}
        # Most keys hold one of a few `plans` and no overrides: one mapping for each (as the
        # API keys' table does) saves 25 MB per process at 100,000 keys, and pickling them.
        self._shared_plans: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
        self._no_overrides: dict[str, PlanOverride] = {}

    def read(self, node: Node) -> tuple[ApiKey, ...]:
        items = self.w.sequence(node, "keys")
        if items is None:
            return ()
        keys: list[ApiKey] = []
        for index, item in enumerate(items):
            key = self._plain_key(item, index)
            if key is None:
                key = self._key(item, index)
            if key is not None:
                keys.append(key)
        return tuple(keys)

    def _plain_key(self, node: Node, index: int) -> ApiKey | None:
        """The key at `node` if it is written the usual way (`name`, `key_sha256` and plain
        `product: plan` entries, all plain strings) and valid; None for anything else, which
        `_key` then reads in full, reporting what is wrong.

        The full reading took 2.2 of the 6-7 s that `gateway check` spent on 100,000 keys;
        this takes 0.9 s. It must make exactly the key `_key` makes from the same node,
        and leave every key it does not accept to `_key` (test_access.py compares the two).
        """
        if type(node) is not MappingNode or node.tag != MAPPING_TAG:
            return None
        if self.products is None or self.plans is None:
            return None
        fields: dict[str, Node] = {}
        for key, value in node.value:
            if type(key) is not ScalarNode or key.tag != STR_TAG or key.value not in _PLAIN:
                return None
            fields[key.value] = value
        name, secret = fields.get("name"), fields.get("key_sha256")
        if len(fields) != len(node.value) or not _is_text(name) or not _is_text(secret):
            return None  # a duplicate, a missing or a non-string name or secret
        if not NAME.fullmatch(name.value) or name.value in self._names:
            return None
        if not SHA256_HEX.fullmatch(secret.value):
            return None
        digest = secret.value.lower()
        if digest in self._digests or digest == EMPTY_KEY_SHA256:
            return None
        chosen: dict[str, str] = {}
        plans = fields.get("plans")
        if plans is not None:
            if type(plans) is not MappingNode or plans.tag != MAPPING_TAG:
                return None
            for product, plan in plans.value:
                if not _is_text(product) or product.value not in self.products:
                    return None
                if not _is_text(plan) or plan.value not in self.plans or not plan.value.strip():
                    return None
                chosen[product.value] = plan.value
            if len(chosen) != len(plans.value):
                return None  # a product named twice
        self._names[name.value] = (index, node.line)
        self._digests[digest] = (index, node.line, name.value)
        shared = self._shared_plans.setdefault(tuple(chosen.items()), chosen)
        return ApiKey(name.value, digest, shared, overrides=self._no_overrides)

    @staticmethod
    def _where(index: int, line: int, name: str | None = None) -> str:
        where = f"keys[{index}], line {line}"
        return f"{name!r} ({where})" if name else where

    def _key(self, node: Node, index: int) -> ApiKey | None:
        w = self.w
        path = f"keys[{index}]"
        fields = w.mapping(node, path, _KEY_KEYS)
        if fields is None:
            return None
        line = line_of(node)
        name = w.required(fields, "name", w.name)
        if name is not None:
            if not NAME.fullmatch(name):
                w.report(fields.value("name"), fields.at("name"), NAME_HINT)
            elif name in self._names:
                first = self._where(*self._names[name])
                message = f"duplicate key name {name!r} (first in {first})"
                w.report(fields.value("name"), fields.at("name"), message)
            else:
                self._names[name] = (index, line)
        digest = self._digest(fields, path)
        if digest is not None:
            secret = "key" if "key" in fields else "key_sha256"
            if digest in self._digests:
                message = f"the same secret as {self._where(*self._digests[digest])}"
                w.report(fields.value(secret), fields.at(secret), message)
            else:
                self._digests[digest] = (index, line, name)
        plans, overrides = self._plans(fields)
        disabled = w.optional(fields, "disabled", w.boolean, False)
        expires = w.optional(fields, "expires", lambda n, p: _instant(w, n, p), None)
        if name is None or digest is None:
            return None
        plans = self._shared_plans.setdefault(tuple(plans.items()), plans)
        overrides = overrides or self._no_overrides
        return ApiKey(name, digest, plans, disabled, overrides=overrides, expires=expires)

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
        if digest is not None and not SHA256_HEX.fullmatch(digest):
            message = "must be 64 hexadecimal characters (see `gateway hash-key`)"
            w.report(fields.value("key_sha256"), fields.at("key_sha256"), message)
            return None
        if digest is not None and digest.lower() == EMPTY_KEY_SHA256:
            w.report(fields.value("key_sha256"), fields.at("key_sha256"), EMPTY_KEY_REFUSAL)
            return None
        return None if digest is None else digest.lower()

    def _plans(self, key: Fields) -> KeyPlans:
        node = key.value("plans")
        if node is None:
            return {}, {}
        return read_key_plans(self.w, node, key.at("plans"), self.products, self.plans)


# What a key's `plans` holds: product -> plan name, and product -> the key's own limits there.
KeyPlans = tuple[dict[str, str], dict[str, PlanOverride]]


def read_key_plans(
    w: Walker,
    node: Node,
    path: str,
    products: Collection[str] | None,
    plans: Collection[str] | None,
) -> KeyPlans:
    """One key's `plans` mapping: `product: PLAN` or `product: {plan: PLAN, rate: ..., quota:
    ...}`; products and plans must be among those declared (None: not checked).

    The one reader of a key's plans, for the file and for the admin API alike
    (`validate_key_plans`), so that both accept exactly the same values."""
    fields = w.mapping(node, path)
    if fields is None:
        return {}, {}
    chosen: dict[str, str] = {}
    overrides: dict[str, PlanOverride] = {}
    for product, product_key, value in fields:
        at = fields.at(product)
        if products is not None and product not in products:
            known = ", ".join(sorted(products)) or "none are declared"
            w.report(product_key, at, f"unknown product (products: {known})")
            continue
        override = None
        plan_node = value
        if not isinstance(value, ScalarNode):
            entry = w.mapping(value, at, _OVERRIDE_KEYS)
            if entry is None:
                continue
            given = entry.value("plan")
            if given is None:
                w.report(entry.node, entry.at("plan"), "is required")
                continue
            plan_node = given
            rate = w.optional(entry, "rate", lambda n, p: _rate(w, n, p), None)
            quota = w.optional(entry, "quota", lambda n, p: _quota(w, n, p), None)
            override = PlanOverride(rate, quota, _writes_refund_on(entry.value("quota")))
            at = entry.at("plan")
        plan = w.name(plan_node, at)
        if plan is not None and plans is not None and plan not in plans:
            known = ", ".join(sorted(plans)) or "none are declared"
            w.report(plan_node, at, f"unknown plan {plan!r} (plans: {known})")
            continue
        if plan is not None:
            chosen[product] = plan
            if override is not None:
                overrides[product] = override
    return chosen, overrides


def _writes_refund_on(quota: Node | None) -> bool:
    if not isinstance(quota, MappingNode):
        return False
    return any(isinstance(key, ScalarNode) and key.value == "refund_on" for key, _ in quota.value)


class _DataWalker(Walker):
    """A walker over data that came as JSON, not from a file: its issues have no line."""

    def report(self, where: Node | int | None, path: str, message: str) -> None:
        self.issues.append(ConfigIssue(self.file, None, path, message))

    def name(self, node: Node, path: str) -> str | None:
        # JSON says what is text: `{"soccer": 1}` is a number, not the name of a plan.
        return self.string(node, path)


def validate_key_plans(
    data: object,
    products: Collection[str] | None,
    plans: Collection[str] | None,
    source: str = "request",
) -> KeyPlans:
    """`read_key_plans` for a key's `plans` given as plain data (a JSON body of the admin API):
    the same rules and messages; raises ConfigError, whose issues name the path of each bad
    value (`plans.soccer.quota.per: must be one of ...`)."""
    issues: list[ConfigIssue] = []
    walker = _DataWalker(source, issues)
    dumper = yaml.SafeDumper(io.StringIO(), sort_keys=False)
    try:
        node = tree_of_pyyaml(dumper.represent_data(data))
    except yaml.YAMLError:
        raise ConfigError([ConfigIssue(source, None, "plans", "must be a mapping")]) from None
    finally:
        # A dumper refers to itself (its `state` is one of its methods): left so, every admin
        # write of a key was a cycle for the collector, which a reload's gc.freeze kept for
        # good (a soak: ~110 dumpers and their nodes kept per worker in 8 minutes).
        dumper.dispose()
    result = read_key_plans(walker, node, "plans", products, plans)
    if issues:
        raise ConfigError(issues)
    return result
