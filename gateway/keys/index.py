"""Steps 2 and 3 of the request path: which key is calling, and may it use this product.

Keys are looked up by the SHA-256 of what the client sent, so the config, the storage and the
process hold only hashes; the key a client sent is never logged, exported or forwarded. The
file's keys are fixed per config; the API keys come from `ApiKeyTable`, which follows the
storage. A name is the file's when both define it: the file is what the operator wrote last.
So is a secret both hold (`gateway.keys.shadowing`, which also tells the operator).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from gateway.collected import freeze_collected
from gateway.config.instants import format_instant
from gateway.config.model import ApiKey, AuthConfig, Plan
from gateway.keys.shadowing import SecretClashes
from gateway.keys.table import ApiKeyTable
from gateway.problems import Forbidden, StorageUnavailable, Unauthorized

# Principals of API keys are made on first use; past this many the cache starts afresh, so
# that keys deleted or changed long ago do not stay in memory.
_MAX_LAZY_PRINCIPALS = 200_000
# Principals made between two freezes at most (`KeyIndex.freeze_made`): the collection before
# each freeze walks about these and what else is not frozen yet.
_FREEZE_MADE = 5_000


@dataclass(frozen=True, slots=True)
class Principal:
    key: ApiKey
    plan: Plan
    subject: str  # "<key name>:<product>": what the limiter counts against


class KeyIndex:
    """The keys one config snapshot serves: the file's, then the API's."""

    def __init__(
        self,
        keys: Iterable[ApiKey],
        plans: Mapping[str, Plan],
        api_keys: ApiKeyTable | None = None,
        clock: Callable[[], float] = time.time,
        *,
        freeze_made: bool = False,
    ) -> None:
        self.file_keys = {key.name: key for key in keys}
        self._by_hash = {key.key_sha256: key for key in self.file_keys.values()}
        self.file_names = sorted(self.file_keys)
        self.api_keys = api_keys if api_keys is not None else ApiKeyTable()
        if api_keys is None:
            self.api_keys.loaded = True
        self._plans = plans
        self._clock = clock
        # One Principal per (key, product), made at the first request of that key for that
        # product and reused from then on: the file's keys' in `_principals` for as long as
        # this index, the API's in `_api_principals`. Not made here for every file key: a
        # reload builds a new index while the old one still serves, and three objects per
        # key and product (300,000 for 100,000 keys) made then, the old ones freed after,
        # scattered the heap: a worker's memory grew from reload to reload (100,000 file and
        # 100,000 API keys: from 199 MiB at the start to 279-284 MiB after 20-30 reloads).
        self._principals: dict[tuple[str, str], Principal] = {}
        self._api_principals: dict[tuple[str, str], Principal] = {}
        self._removals_seen = self.api_keys.removals
        # Walks the file's secrets once: built with the index, off the event loop on a reload.
        self.secret_clashes = SecretClashes(self._by_hash, self.api_keys, clock)
        # Principals made for requests live until the next reload, which starts a new index:
        # what is made of them is left out of full collections every _FREEZE_MADE, as a full
        # read of the API keys is. Else, after each reload, every full collection walked all
        # the principals made since, on the event loop (measured: 13-110 ms while 100,000 file
        # or API keys made their first requests). Set by a gateway worker (see
        # `KeyStore.freeze_reads`).
        self.freeze_made = freeze_made
        self._made_unfrozen = 0

    def file_digest_owner(self, digest: str) -> str | None:
        key = self._by_hash.get(digest)
        return None if key is None else key.name

    def by_name(self, name: str) -> ApiKey | None:
        """The key called `name`, from the file or the API."""
        key = self.file_keys.get(name)
        if key is not None:
            return key
        record = self.api_keys.records.get(name)
        return None if record is None else record.to_api_key()

    def identify(self, auth: AuthConfig, presented: str | None) -> ApiKey:
        """The key the client presented (in `auth.header`, else `auth.query_param`), or 401."""
        if not presented:
            where = f"the {auth.header} header"
            if auth.query_param is not None:
                where += f" or the {auth.query_param} query parameter"
            raise Unauthorized(f"An API key is required in {where}.")
        # Header values are decoded with surrogateescape: hashing the bytes the client sent,
        # a key that is not UTF-8 is unknown (401), like any other.
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).hexdigest()
        key = self._by_hash.get(digest)
        if key is None:
            key = self._api_key(digest)
        if key.expires is not None and self._clock() >= key.expires:
            raise Unauthorized(
                f"The API key '{key.name}' expired at {format_instant(key.expires)}.",
                key_name=key.name,
            )
        return key

    def _api_key(self, digest: str) -> ApiKey:
        secret = self.api_keys.secret(digest)
        if secret is None:
            if not self.api_keys.loaded:
                # It may be a key the storage has and this process has not read yet.
                raise StorageUnavailable()
            raise Unauthorized("The API key is not valid.")
        key, until = secret
        if until is not None and self._clock() >= until:
            raise Unauthorized(
                f"The API key was replaced by a rotation; it was accepted until "
                f"{format_instant(until)}.",
                key_name=key.name,
            )
        if key.name in self.file_keys:
            # The file defines this name: its key wins, and this one is unknown.
            raise Unauthorized("The API key is not valid.")
        return key

    def authorize(self, key: ApiKey, product: str) -> Principal:
        """The key's plan for this product, or 403."""
        if key.disabled:
            raise Forbidden(f"The API key '{key.name}' is disabled.")
        principal = self._principals.get((key.name, product))
        if principal is None or principal.key is not key:
            principal = self._first_or_api_principal(key, product)
        return principal

    def _first_or_api_principal(self, key: ApiKey, product: str) -> Principal:
        # Cached first: a principal is only kept for this very key object, whose plan for the
        # product (an override builds a new Plan each time) was found with this index's plans.
        cached = self._api_principals.get((key.name, product))
        if cached is not None and cached.key is key:
            return cached
        plan = key.plan_for(product, self._plans)
        if plan is None:
            raise Forbidden(_no_plan_detail(key, product))
        principal = Principal(key, plan, f"{key.name}:{product}")
        if self.file_keys.get(key.name) is key:
            # A file key's first request for this product: kept as long as this index, whose
            # config bounds them (the key's own limits are applied in `plan`).
            self._principals[key.name, product] = principal
        else:
            removals = self.api_keys.removals
            if removals != self._removals_seen or len(self._api_principals) >= _MAX_LAZY_PRINCIPALS:
                # Keys were deleted since: theirs go (a soak audit saw a deleted key's
                # principal, and its key, kept until the cap of 200,000).
                self._api_principals.clear()
                self._removals_seen = removals
            self._api_principals[key.name, product] = principal
        if self.freeze_made:
            self._made_unfrozen += 1
            if self._made_unfrozen >= _FREEZE_MADE:
                self._made_unfrozen = 0
                freeze_collected()
        return principal


def _no_plan_detail(key: ApiKey, product: str) -> str:
    name = key.plans.get(product)
    if name is None:
        return f"The API key '{key.name}' has no plan for the product '{product}'."
    # An API key whose plan a reload took out of the config (API keys are data): "no plan"
    # would send its customer to the wrong cause; the operator's log names it too.
    return (
        f"The API key '{key.name}' has the plan '{name}' for the product '{product}',"
        " which this gateway no longer offers."
    )
