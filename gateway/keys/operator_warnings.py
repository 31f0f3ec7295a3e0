"""What the key store tells the operator about the API keys it serves: keys naming products or
plans the config lacks, and keys a storage emptied behind the gateway's back has lost."""

from __future__ import annotations

import logging
from collections.abc import Collection

from gateway.keys.table import ApiKeyTable

log = logging.getLogger("gateway.keys")

# Products and plans one warning of keys naming some the config lacks names at most.
_NAMES_TOLD = 20
_LOST_NAMED = 20  # keys named in the error of an emptied storage; the rest counted


def tell_not_in_config(
    table: ApiKeyTable, products: Collection[str], plans: Collection[str]
) -> None:
    """One WARNING when API keys of `table` name a product or plan the config lacks."""
    keys, named = table.not_in_config(products, plans)
    if not keys:
        return
    # Products first: their entries are not counted under their plans.
    told = sorted(named.items(), key=lambda item: (not item[0].startswith("product"), item))
    listed = "; ".join(
        f"{name}: {count} {'key' if count == 1 else 'keys'}" for name, count in told[:_NAMES_TOLD]
    )
    if len(told) > _NAMES_TOLD:
        listed += f"; and {len(told) - _NAMES_TOLD} more"
    log.warning(
        "API keys naming a product or plan the config no longer has: %d (%s); their"
        " requests on those products are 403 (404 where the product is gone) until the"
        " config has them again or the keys are changed (PATCH /admin/keys/NAME; GET"
        " /admin/keys shows each key's entries under not_in_config)",
        keys,
        listed,
    )


def tell_lost(names: list[str]) -> None:
    """One ERROR naming the API keys an emptied storage no longer holds."""
    shown = sorted(names)[:_LOST_NAMED]
    more = f" and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
    log.error(
        "API keys: the storage was emptied (a Redis restarted without persistence, or a "
        "FLUSHALL) and no longer holds %d API keys this process served; they are unknown (401) "
        "from now on. Restore the storage from a backup to bring them back: %s%s",
        len(names),
        ", ".join(shown),
        more,
    )
