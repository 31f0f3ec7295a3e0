"""The admin keys API on a real gateway (one process, memory:// storage unless said otherwise; the
rig fixture): creating keys, reading and listing them, and what the proxy port makes of the keys
it creates.
"""

from __future__ import annotations

import hashlib

import pytest

from tests.support.keys_api_rig import Rig, create


async def test_create_shows_the_secret_once_and_it_works_at_once(rig: Rig) -> None:
    created = await create(rig, "acme", expires="2099-01-01T00:00:00+01:00")

    secret = created.pop("key")
    assert len(secret) >= 40
    assert created["name"] == "acme" and created["source"] == "api"
    assert created["plans"] == {"soccer": "trial"} and created["disabled"] is False
    assert created["expires"] == "2098-12-31T23:00:00Z" and created["expired"] is False
    status, _ = await rig.proxy(secret)
    assert status == 200
    status, fetched, _ = await rig.call("GET", "/admin/keys/acme")
    assert status == 200 and "key" not in fetched and "key_sha256" not in fetched
    assert fetched == created
    # The key is counted under its name, like a file key: the usage API knows it.
    status, usage, _ = await rig.call("GET", "/admin/usage/acme")
    assert status == 200 and usage["products"]["soccer"]["plan"] == "trial"


async def test_import_by_digest_returns_no_secret(rig: Rig) -> None:
    digest = hashlib.sha256(b"made-elsewhere").hexdigest().upper()
    created = await create(rig, "imported", key_sha256=digest)
    assert "key" not in created
    assert (await rig.proxy("made-elsewhere"))[0] == 200
    assert (await rig.proxy("made-elsewhere", "/weather/x"))[0] == 403


async def test_list_pages_by_name_over_file_and_api_keys(rig: Rig) -> None:
    for name in ("b", "d", "z.last", "a"):
        await create(rig, name)
    seen: list[str] = []
    sources: dict[str, str] = {}
    after = ""
    pages = 0
    while True:
        status, page, _ = await rig.call("GET", f"/admin/keys?limit=2&after={after}")
        assert status == 200 and len(page["keys"]) <= 2
        pages += 1
        seen += [key["name"] for key in page["keys"]]
        sources |= {key["name"]: key["source"] for key in page["keys"]}
        if page["next"] is None:
            break
        after = page["next"]
    assert seen == ["a", "b", "d", "file-key", "m-file-key", "z.last"]
    assert pages == 3
    assert sources["file-key"] == "file" and sources["a"] == "api"
    status, everything, _ = await rig.call("GET", "/admin/keys")
    assert [key["name"] for key in everything["keys"]] == seen and everything["next"] is None
    assert all("key" not in key for key in everything["keys"])


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        # Misspelt, it was left out: the first page of every key, as if asked for.
        ("?afer=b&limit=2", "afer: unknown parameter (allowed: after, limit)"),
        ("?after=a&after=z", "after: given twice"),
        ("?limit=1&limit=1000", "limit: given twice"),
    ],
)
async def test_a_list_query_is_taken_as_it_says_or_refused(
    rig: Rig, query: str, detail: str
) -> None:
    status, problem, _ = await rig.call("GET", f"/admin/keys{query}")
    assert (status, problem["code"], problem["detail"]) == (400, "bad_request", detail)


async def test_file_key_shows_its_expiry(rig: Rig) -> None:
    status, key, _ = await rig.call("GET", "/admin/keys/m-file-key")
    assert status == 200
    assert key["source"] == "file" and key["expires"] == "2020-01-01T00:00:00Z"
    assert key["expired"] is True
