"""The API keys one process serves from: every key of the storage, in memory.

Only the key store (`gateway.keys.store`) changes the table, as it follows the storage; the
request path reads it through `KeyIndex`. A lookup is a dict access by digest, so a request
costs no storage call to find its key, and a made-up key costs none either.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from gateway.config.model import ApiKey, not_in_config
from gateway.keys.records import KeyRecord

# digest -> (the key, the time until which this digest is accepted; None: no end but the
# key's own `expires`). A rotated-out secret leads to the same ApiKey as the new one, so
# both count against one subject.
Secret = tuple[ApiKey, float | None]


class ApiKeyTable:
    def __init__(self) -> None:
        self.records: dict[str, KeyRecord] = {}
        self._secrets: dict[str, Secret] = {}
        # Many keys share the same plans: one mapping per distinct plans saves memory at
        # 100,000 keys.
        self._shared_plans: dict[tuple[tuple[str, str], ...], Mapping[str, str]] = {}
        self._sorted_names: list[str] | None = None
        # Counts removals (and whole replacements): a key index drops what it built for keys
        # (their principals) when this moved, else a deleted key's stayed until its cache cap.
        self.removals = 0
        # False until the storage has been read once: an unknown key may then be one the
        # process has not loaded yet rather than a made-up one.
        self.loaded = False

    def __len__(self) -> int:
        return len(self.records)

    def secret(self, digest: str) -> Secret | None:
        return self._secrets.get(digest)

    def secrets_among(self, digests: Mapping[str, object]) -> Iterator[tuple[str, Secret]]:
        """The secrets the table holds of `digests`, by walking the fewer of the two. On the
        event loop only: elsewhere the table may change during the walk."""
        if len(digests) <= len(self._secrets):
            for digest in digests:
                found = self._secrets.get(digest)
                if found is not None:
                    yield digest, found
        else:
            for digest, found in self._secrets.items():
                if digest in digests:
                    yield digest, found

    def put(self, record: KeyRecord) -> None:
        self._forget(record.name)
        plans_items = tuple(sorted(record.plan_names().items()))
        plans = self._shared_plans.setdefault(plans_items, dict(plans_items))
        key = record.to_api_key(plans)
        self.records[record.name] = record
        for old in record.previous:
            self._secrets[old.key_sha256] = (key, old.until)
        self._secrets[record.key_sha256] = (key, None)
        self._sorted_names = None

    def remove(self, name: str) -> None:
        self._forget(name)
        self._sorted_names = None
        self.removals += 1

    def take(self, fresh: ApiKeyTable) -> list[dict[Any, Any]]:
        """Serve what `fresh` holds from now on: a table filled bit by bit off to the side
        (between reads of the storage) and swapped in at once. Returns the containers given
        up, for the caller to empty at its pace (freeing them is not free)."""
        given_up: list[dict[Any, Any]] = [self.records, self._secrets, self._shared_plans]
        self.records = fresh.records
        self._secrets = fresh._secrets
        self._shared_plans = fresh._shared_plans
        self._sorted_names = None
        self.loaded = True
        self.removals += 1
        return given_up

    def not_in_config(
        self, products: Collection[str], plans: Collection[str]
    ) -> tuple[int, dict[str, int]]:
        """How many keys name a product or plan the config lacks, and for each such name
        ("product 'x'", "plan 'y'") how many keys name it (an entry whose product is gone
        counts for the product alone). The distinct plan mappings are few, so the keys are
        only walked when one of them names something missing."""
        shared = self._shared_plans.values()
        if not any(not_in_config(names, products, plans) for names in shared):
            return 0, {}
        keys = 0
        named: dict[str, int] = {}
        for record in self.records.values():
            plan_names = record.plan_names()
            missing = not_in_config(plan_names, products, plans)
            if not missing:
                continue
            keys += 1
            # A set: a key naming a missing plan on two products counts once for it.
            names = {
                f"plan '{plan_names[product]}'" if what == "plan" else f"product '{product}'"
                for product, what in missing.items()
            }
            for name in names:
                named[name] = named.get(name, 0) + 1
        return keys, named

    def names_after(self, after: str, limit: int) -> list[str]:
        """Up to `limit` names that sort after `after`, in order."""
        if self._sorted_names is None:
            self._sorted_names = sorted(self.records)
        start = bisect.bisect_right(self._sorted_names, after)
        return self._sorted_names[start : start + limit]

    def _forget(self, name: str) -> None:
        record = self.records.pop(name, None)
        if record is None:
            return
        for digest in record.digests():
            secret = self._secrets.get(digest)
            if secret is not None and secret[0].name == name:
                del self._secrets[digest]
