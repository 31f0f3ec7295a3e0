"""A key made through the admin API, as the storage keeps it.

The record is one JSON object per key. It holds only SHA-256 digests of secrets: the current
one, and those a rotation left valid until their grace ends. Times are unix seconds.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.config.access import validate_key_plans
from gateway.config.model import ApiKey, PlanOverride
from gateway.config.yamlnodes import ConfigError

# Names of API keys: 1-64 characters, so that they fit labels, logs and URLs; not `.` or `..`,
# which a client (curl, a browser) removes from a URL's path as dot-segments.
KEY_NAME = re.compile(r"(?!\.\.?\Z)[A-Za-z0-9._-]{1,64}")
KEY_NAME_HINT = "must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' and '-', not '.' or '..'"


@dataclass(frozen=True, slots=True)
class PreviousSecret:
    """A secret replaced by a rotation, still accepted until `until`."""

    key_sha256: str
    until: float


@dataclass(frozen=True, slots=True)
class KeyRecord:
    name: str
    key_sha256: str
    # The key's `plans` as the admin API accepted them: product -> plan name, or any other
    # form a file key's `plans` takes (the same reader checked them).
    plans: Mapping[str, Any]
    disabled: bool = False
    expires: float | None = None
    created: float = 0.0
    updated: float = 0.0
    previous: tuple[PreviousSecret, ...] = field(default=())

    def digests(self) -> tuple[str, ...]:
        """Every digest that leads to this key: the current one and the rotated ones."""
        return (self.key_sha256, *(old.key_sha256 for old in self.previous))

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "key_sha256": self.key_sha256,
                "plans": dict(self.plans),
                "disabled": self.disabled,
                "expires": self.expires,
                "created": self.created,
                "updated": self.updated,
                "previous": [
                    {"key_sha256": old.key_sha256, "until": old.until} for old in self.previous
                ],
            },
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> KeyRecord:
        """The record stored as `text`; ValueError if the storage holds something else."""
        try:
            data: Any = json.loads(text)
            plans = data["plans"]
            if not isinstance(plans, dict):
                raise ValueError("plans must be a mapping")
            return cls(
                name=str(data["name"]),
                key_sha256=str(data["key_sha256"]),
                plans=plans,
                disabled=bool(data["disabled"]),
                expires=None if data["expires"] is None else float(data["expires"]),
                created=float(data["created"]),
                updated=float(data["updated"]),
                previous=tuple(
                    PreviousSecret(str(old["key_sha256"]), float(old["until"]))
                    for old in data["previous"]
                ),
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a key record: {exc}") from exc

    def plan_names(self) -> dict[str, str]:
        """product -> plan name: a name as such, or the `plan` of a mapping."""
        names: dict[str, str] = {}
        for product, plan in self.plans.items():
            name = plan.get("plan") if isinstance(plan, dict) else plan
            if isinstance(name, str):
                names[product] = name
        return names

    def to_api_key(self, plan_names: Mapping[str, str] | None = None) -> ApiKey:
        """The key as the request path serves it; `plan_names` may be a shared equal mapping
        of `self.plan_names()`."""
        return ApiKey(
            self.name,
            self.key_sha256,
            self.plan_names() if plan_names is None else plan_names,
            self.disabled,
            overrides=plan_overrides(self.plans, self.name),
            expires=self.expires,
        )


log = logging.getLogger("gateway.keys")

# Keys with their own limits mostly share a few shapes of them: each shape is read once.
_overrides_read: dict[str, Mapping[str, PlanOverride]] = {}
_MAX_OVERRIDE_SHAPES = 10_000
_NO_OVERRIDES: Mapping[str, PlanOverride] = {}


def plan_overrides(plans: Mapping[str, Any], key_name: str = "") -> Mapping[str, PlanOverride]:
    """The key's own limits per product, from its `plans` as the admin API accepted them
    (entries `{plan: NAME, rate: ..., quota: ...}`; plain plan names have none)."""
    own = {product: plan for product, plan in plans.items() if isinstance(plan, dict)}
    if not own:
        return _NO_OVERRIDES
    shape = json.dumps(own, sort_keys=True)
    read = _overrides_read.get(shape)
    if read is None:
        read = _read_overrides(own, key_name)
        if len(_overrides_read) >= _MAX_OVERRIDE_SHAPES:
            _overrides_read.clear()
        _overrides_read[shape] = read
    return read


def _read_overrides(own: Mapping[str, Any], key_name: str) -> Mapping[str, PlanOverride]:
    try:
        # Checked against the config when the API accepted them; read here without it.
        return validate_key_plans(own, None, None)[1]
    except ConfigError:
        pass
    # Only a record written before the API checked everything it stores: older gateways took
    # a limit sent back in a PATCH as 5.0 or true (for a stored 5 or 1) unchecked. Each product's
    # entry is read on its own, so one bad entry costs that product its own limits alone, and
    # the operator is told which key to PATCH (once per shape and process, as it is cached).
    read: dict[str, PlanOverride] = {}
    for product, entry in own.items():
        try:
            read.update(validate_key_plans({product: entry}, None, None)[1])
        except ConfigError as error:
            log.warning(
                "API key %r: its own limits for product %r cannot be read (%s); the plan's "
                "limits apply until a PATCH of its plans sets them again",
                key_name,
                product,
                "; ".join(f"{issue.path}: {issue.message}" for issue in error.issues),
            )
    return read
