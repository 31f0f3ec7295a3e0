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


def clash_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gateway.keys"]


def test_a_secret_in_both_is_the_file_keys_and_each_clash_is_told_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = time.time()
    table = ApiKeyTable()
    replace_all(
        table,
        [
            record("api-current", "one"),
            record("api-rotated", "new", previous=(PreviousSecret(digest("two"), now + 60),)),
            record("api-retired", "newer", previous=(PreviousSecret(digest("three"), now - 1),)),
            record("same-name", "four"),
        ],
    )
    file_keys = [
        ApiKey(f"file-{secret}", digest(secret), {"soccer": "trial"})
        for secret in ("one", "two", "three")
    ]
    index = KeyIndex([*file_keys, ApiKey("same-name", digest("four"), {})], PLANS, table)
    for secret in ("one", "two", "three"):
        assert index.identify(AUTH, secret).name == f"file-{secret}"
    assert index.identify(AUTH, "new").name == "api-rotated"

    index.secret_clashes.tell()
    said = clash_warnings(caplog)
    # A retired secret is no key's, and a name in both is the name rule's: neither is told.
    assert len(said) == 2, said
    assert "the file key 'file-one' has the secret of the API key 'api-current'" in said[0]
    assert "a rotated-out secret of the API key 'api-rotated' (accepted until" in said[1]

    caplog.clear()
    index.secret_clashes.tell()
    index.secret_clashes.tell_all()
    for each in table.records.values():
        index.secret_clashes.tell_record(each)
    assert clash_warnings(caplog) == []  # once for this config
    # A new clash of the same config is told when the storage brings it.
    table.put(record("api-current", "three"))
    index.secret_clashes.tell_record(table.records["api-current"])
    assert clash_warnings(caplog) == [
        "API keys: the file key 'file-three' has the secret of the API key 'api-current'; "
        "requests with it are served as the file key, never as 'api-current', until one of "
        "them has another secret (POST /admin/keys/api-current/rotate, or change the file)"
    ]


def test_many_clashes_are_named_up_to_twenty_and_the_rest_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    table = ApiKeyTable()
    replace_all(table, (record(f"api-{n}", f"secret-{n}") for n in range(25)))
    file_keys = (ApiKey(f"file-{n}", digest(f"secret-{n}"), {}) for n in range(25))
    KeyIndex(file_keys, PLANS, table).secret_clashes.tell()
    said = clash_warnings(caplog)
    assert len(said) == 21 and said[-1].startswith("API keys: and 5 more secrets"), said
