"""The in-memory table of API keys and the index the request path asks."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import pytest

from gateway.config.model import ApiKey, AuthConfig, Plan
from gateway.keys import ApiKeyTable, KeyIndex, KeyRecord
from gateway.keys.records import PreviousSecret
from gateway.problems import Forbidden, StorageUnavailable, Unauthorized

PLANS = {"trial": Plan("trial")}
AUTH = AuthConfig()


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def record(name: str, secret: str, **fields: Any) -> KeyRecord:
    return replace(KeyRecord(name, digest(secret), {"soccer": "trial"}), **fields)


def replace_all(table: ApiKeyTable, records: Iterable[KeyRecord]) -> None:
    """Start the table over from a full read, as the key store does: filled aside, taken."""
    fresh = ApiKeyTable()
    for each in records:
        fresh.put(each)
    table.take(fresh)


def test_put_replace_and_remove_follow_every_secret() -> None:
    table = ApiKeyTable()
    table.put(record("acme", "one"))
    rotated = record(
        "acme",
        "two",
        previous=(PreviousSecret(digest("one"), time.time() + 60),),
    )
    table.put(rotated)
    old, new = table.secret(digest("one")), table.secret(digest("two"))
    assert old is not None and new is not None and old[0] is new[0]
    table.put(record("acme", "three"))  # a rotation without grace
    assert table.secret(digest("one")) is None and table.secret(digest("two")) is None
    table.remove("acme")
    assert table.secret(digest("three")) is None and len(table) == 0


def test_keys_with_equal_plans_share_one_mapping() -> None:
    table = ApiKeyTable()
    replace_all(table, [record("a", "1"), record("b", "2")])
    first, second = table.secret(digest("1")), table.secret(digest("2"))
    assert first is not None and second is not None
    assert first[0].plans is second[0].plans
    assert table.loaded


def test_names_after_pages_in_order() -> None:
    table = ApiKeyTable()
    replace_all(table, (record(name, name) for name in ("c", "a", "d", "b")))
    assert table.names_after("", 2) == ["a", "b"]
    assert table.names_after("b", 5) == ["c", "d"]
    table.put(record("bb", "bb"))
    assert table.names_after("b", 1) == ["bb"]


def test_index_prefers_the_file_key_of_a_name() -> None:
    table = ApiKeyTable()
    replace_all(table, [record("shared", "api-secret"), record("own", "own-secret")])
    index = KeyIndex([ApiKey("shared", digest("file-secret"), {"soccer": "trial"})], PLANS, table)
    assert index.identify(AUTH, "file-secret").name == "shared"
    with pytest.raises(Unauthorized):
        index.identify(AUTH, "api-secret")
    own = index.identify(AUTH, "own-secret")
    principal = index.authorize(own, "soccer")
    assert principal.subject == "own:soccer" and principal.plan is PLANS["trial"]
    assert index.authorize(own, "soccer") is principal  # made once, then reused
    with pytest.raises(Forbidden):
        index.authorize(own, "weather")


def test_a_deleted_keys_principal_is_not_kept() -> None:
    """Principals are made once per key and product, then reused; a deleted key's was kept
    (and its key with it) until the cache held 200,000, which key churn reaches."""
    table = ApiKeyTable()
    index = KeyIndex([], PLANS, table)
    for round_ in range(3):
        table.put(record(f"churn-{round_}", f"secret-{round_}"))
        key = index.identify(AUTH, f"secret-{round_}")
        index.authorize(key, "soccer")
        table.remove(f"churn-{round_}")
    table.put(record("last", "last-secret"))
    index.authorize(index.identify(AUTH, "last-secret"), "soccer")
    assert [name for name, _ in index._api_principals] == ["last"]


def test_unknown_key_before_the_first_load_is_503_not_401() -> None:
    table = ApiKeyTable()
    index = KeyIndex([], PLANS, table)
    with pytest.raises(StorageUnavailable):
        index.identify(AUTH, "maybe-a-key")
    replace_all(table, [])
    with pytest.raises(Unauthorized):
        index.identify(AUTH, "maybe-a-key")


def test_records_survive_their_json_form() -> None:
    original = record(
        "acme",
        "s",
        disabled=True,
        expires=1798761600.0,
        created=1.5,
        updated=2.5,
        previous=(PreviousSecret("a" * 64, 3.0),),
    )
    assert KeyRecord.from_json(original.to_json()) == original
    with pytest.raises(ValueError, match="not a key record"):
        KeyRecord.from_json('{"name": "x"}')
    with pytest.raises(ValueError):
        KeyRecord.from_json("not json")
