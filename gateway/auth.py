"""Steps 2 and 3 of the request path: which key is calling, and may it use this product.

Keys are looked up by the SHA-256 of what the client sent, so the config and the process hold
only hashes; the key a client sent is never logged, exported or forwarded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gateway.config.model import ApiKey, AuthConfig, Plan
from gateway.problems import Forbidden, Unauthorized


@dataclass(frozen=True, slots=True)
class Principal:
    key: ApiKey
    plan: Plan
    subject: str  # "<key name>:<product>": what the limiter counts against


class KeyIndex:
    def __init__(self, keys: Iterable[ApiKey], plans: Mapping[str, Plan]) -> None:
        self._by_hash = {key.key_sha256: key for key in keys}
        self._plans = plans
        # One Principal per (key, product), built once so the hot path allocates nothing.
        self._principals: dict[tuple[str, str], Principal] = {}
        for key in self._by_hash.values():
            for product, plan_name in key.plans.items():
                subject = f"{key.name}:{product}"
                self._principals[key.name, product] = Principal(key, plans[plan_name], subject)

    def identify(self, auth: AuthConfig, presented: str | None) -> ApiKey:
        """The key the client presented (in `auth.header`, else `auth.query_param`), or 401."""
        if not presented:
            where = f"the {auth.header} header"
            if auth.query_param is not None:
                where += f" or the {auth.query_param} query parameter"
            raise Unauthorized(f"An API key is required in {where}.")
        key = self._by_hash.get(hashlib.sha256(presented.encode()).hexdigest())
        if key is None:
            raise Unauthorized("The API key is not valid.")
        return key

    def authorize(self, key: ApiKey, product: str) -> Principal:
        """The key's plan for this product, or 403."""
        if key.disabled:
            raise Forbidden(f"The API key '{key.name}' is disabled.")
        principal = self._principals.get((key.name, product))
        if principal is None:
            raise Forbidden(f"The API key '{key.name}' has no plan for the product '{product}'.")
        return principal
